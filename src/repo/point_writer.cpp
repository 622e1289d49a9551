// PointWriter: builds a new point as a copy-on-write of its parent's index.
// Only the index nodes on the path to a changed block are written anew, so a
// delta costs its changed blocks plus about 24 bytes per block of touched
// leaves, and every point still has a complete index of its own.
//
// Crash safety: records go to this point's pack, which becomes visible only
// after it is complete and fsync'ed; the manifest is written after that. A
// crash before the manifest leaves an orphan pack that the next writer of the
// VDI removes (clean_leftovers), under the same lock.
//
// Format 2: records go to the shared store (StoreWriter), and a record whose
// id the store holds already is referenced, not written: a block unchanged
// since the parent is known by its id alone, one that another VDI has (a
// clone, a chain break) by the dedup index. The store's packs are committed
// before the manifest too; what a crash leaves there is the store's garbage.
#include <unistd.h>

#include <cstring>
#include <thread>

#include "cbtfs/point_writer.hpp"

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/point_list.hpp"
#include "cbtfs/point_reader.hpp"
#include "store_writer.hpp"

namespace cbtfs {

namespace {
constexpr size_t kMaxPending = 32;  // 2 MiB of blocks in flight per writer
}

PointWriter::PointWriter(std::shared_ptr<Repository> repo, const std::string& vdi, PointInfo info,
                         const std::string& holder)
    : repo_(std::move(repo)), vdi_(vdi), info_(std::move(info)) {
  if (!is_uuid(vdi_)) throw UsageError("'" + vdi_ + "' is not a VDI uuid");
  if (info_.virtual_size == 0) throw UsageError("a disk of size 0 cannot be backed up");
  if (info_.virtual_size > (uint64_t{1} << 50)) throw UsageError("virtual size above 1 PiB is not supported");
  lock_ = repo_->lock_vdi(vdi_, holder);
  uint32_t max_seq = clean_leftovers();

  auto latest = repo_->latest(vdi_);
  if (latest && info_.time <= latest->time)
    throw UsageError("point time " + format_iso_time(info_.time) + " is not after the latest point of VDI " + vdi_ +
                     " (" + format_iso_time(latest->time) + ")");
  if (latest) latest_time_ = latest->time;
  m_.vdi = vdi_;
  m_.seq = max_seq + 1;  // past damaged manifests too: never reuse a name
  m_.time = info_.time;
  m_.virtual_size = info_.virtual_size;
  m_.depth = tree_depth(cbtfs::block_count(info_.virtual_size));
  m_.vdi_name = info_.vdi_name;
  m_.vm_name = info_.vm_name;
  m_.vm_uuid = info_.vm_uuid;
  m_.snapshot_uuid = info_.snapshot_uuid;
  nblocks_ = cbtfs::block_count(info_.virtual_size);

  if (latest && !info_.force_full && latest->virtual_size == info_.virtual_size) {
    parent_ = latest;
    // A parent written before the count existed is counted once here.
    blocks_allocated_ = latest->blocks_allocated
                            ? *latest->blocks_allocated
                            : PointReader(repo_, latest, false).allocated_blocks(0, nblocks_);
    m_.parent = latest->seq;
    m_.chain = latest->chain;
    m_.root = latest->root;
  } else {
    m_.chain = m_.seq;
    if (info_.force_full)
      m_.chain_reason = info_.chain_reason;
    else if (latest)
      m_.chain_reason = "virtual size changed from " + std::to_string(latest->virtual_size) + " to " +
                        std::to_string(info_.virtual_size);
  }
  m_.format = repo_->format();
  levels_.resize(m_.depth);
  pool_ = std::make_unique<EncoderPool>(std::max(1u, std::thread::hardware_concurrency()));
  if (m_.format >= 2) store_ = std::make_unique<StoreWriter>(*repo_, vdi_, [this] { lock_->check(); });
}

PointWriter::~PointWriter() = default;  // an uncommitted pack is discarded by its writer

uint32_t PointWriter::clean_leftovers() {
  auto& st = repo_->storage();
  st.remove_temporaries(layout::points_dir(vdi_));
  st.remove_temporaries(layout::packs_dir(vdi_));
  uint32_t max_seq = repo_->highest_seq(vdi_);
  // Point seqs only grow and the newest point is never pruned, so a pack
  // newer than every manifest is exactly one whose writer died before its
  // manifest landed. Older packs without a manifest of their own may still
  // hold blocks that later points share: they stay.
  // Its number is not used again either: a writer that lost its lock
  // while stalled must never find its number taken by other bytes.
  uint32_t used = max_seq;
  for (auto& n : st.list(layout::packs_dir(vdi_))) {
    uint32_t pack = layout::parse_pack_name(n);
    if (pack <= max_seq) continue;
    st.remove(layout::pack_key(vdi_, pack));
    used = std::max(used, pack);
  }
  return used;
}

std::vector<BlockRef> PointWriter::load_node(const BlockRef& ref) {
  std::vector<BlockRef> entries(kFanout);
  if (ref.is_zero()) return entries;
  auto node = repo_->node(vdi_, ref);
  IndexNode stored(*node, repo_->format());
  for (uint32_t i = 0; i < kFanout; ++i) entries[i] = stored[i];
  return entries;
}

void PointWriter::append(BlockRef& ref, Bytes& stored) {
  if (store_) {
    store_->append(ref, std::move(stored));
    return;
  }
  if (!pack_) {
    pack_ = repo_->storage().create(layout::pack_key(vdi_, m_.seq));
    pack_->append(encode_pack_header(m_.seq, 1));
  }
  ref.pack = m_.seq;
  ref.offset = pack_->size();
  ref.stored_check = 0;  // a format 1 reference has no room for it: as it reads back
  pack_->append(std::move(stored));
}

BlockRef PointWriter::store(std::span<const std::byte> plain) {
  BlockRef ref;
  if (store_) {
    ref.id = block_id(repo_->id_key(), plain);
    if (auto found = store_->find(ref.id); found.ref) return *found.ref;  // else stored here and now
  }
  Bytes stored = encode_stored_record(Bytes(plain.begin(), plain.end()), ref, hash_bytes(plain), repo_->sealer());
  append(ref, stored);
  return ref;
}

void PointWriter::drain(size_t keep) {
  while (pending_.size() > keep) {
    // Never wait for another point while holding records it may wait for
    // in turn: ours are appended first, so no two points wait on each other.
    if (pending_.front().waiting &&
        pending_.front().waiting->wait_for(std::chrono::seconds(0)) != std::future_status::ready)
      append_own_pending();
    Pending p = std::move(pending_.front());
    pending_.pop_front();
    if (p.waiting)
      settle(p);
    else
      append_encoded(p);
  }
  // What is compressed already goes out now: another point may be waiting
  // for it, and a slow source must not hold it back.
  while (store_ && !pending_.empty() && !pending_.front().waiting &&
         pending_.front().encoded.wait_for(std::chrono::seconds(0)) == std::future_status::ready) {
    Pending p = std::move(pending_.front());
    pending_.pop_front();
    append_encoded(p);
  }
}

// Pending blocks all belong to the loaded leaf (drained before it changes).
void PointWriter::append_encoded(Pending& p) {
  EncoderPool::Encoded e = p.encoded.get();
  e.ref.id = p.id;
  if (p.compress) raw_run_ = e.ref.raw() ? raw_run_ + 1 : 0;
  append(e.ref, e.stored);
  pending_ids_.erase(p.id);
  levels_[0].entries[p.block % kFanout] = e.ref;
}

void PointWriter::append_own_pending() {
  std::deque<Pending> waiting;
  for (auto& p : pending_) {
    if (p.waiting)
      waiting.push_back(std::move(p));
    else
      append_encoded(p);
  }
  pending_ = std::move(waiting);
}

// Another point's record, once appended; if it never comes (its writer
// failed, or is stalled on its source), this point stores its own copy and
// stops waiting for others: a repeat costs space, a stall would cost time.
void PointWriter::settle(Pending& p) {
  constexpr auto kPatience = std::chrono::seconds(2);
  std::optional<BlockRef> ref;
  if (p.waiting->wait_for(patient_ ? kPatience : std::chrono::seconds(0)) == std::future_status::ready) {
    try {
      ref = store_->adopt(p.waiting->get());
    } catch (const std::future_error&) {  // abandoned
    }
  } else {
    patient_ = false;
  }
  if (!ref) {
    ref.emplace();
    ref->id = p.id;
    uint64_t hash = hash_bytes(p.data);
    Bytes stored = encode_stored_record(std::move(p.data), *ref, hash, repo_->sealer());
    append(*ref, stored);
    ++blocks_written_;
  }
  levels_[0].entries[p.block % kFanout] = *ref;
}

// Loads node `index` of `level`, first finishing the node it replaces there.
void PointWriter::ensure(uint32_t level, uint64_t index) {
  Level& l = levels_[level];
  if (l.index == static_cast<int64_t>(index)) return;
  if (l.index >= 0) finish(level);
  BlockRef old;
  if (level + 1 < m_.depth) {
    ensure(level + 1, index / kFanout);
    old = levels_[level + 1].entries[index % kFanout];
  } else {
    old = m_.root;
  }
  l.index = static_cast<int64_t>(index);
  l.old_ref = old;
  l.entries = load_node(old);
  l.dirty = false;
}

void PointWriter::finish(uint32_t level) {
  if (level == 0) {
    compare_candidates();  // they belong to this leaf
    drain(0);
  }
  Level& l = levels_[level];
  BlockRef ref = l.old_ref;
  if (l.dirty) {
    bool empty = true;
    for (auto& e : l.entries) empty = empty && e.is_zero();
    if (empty) {
      ref = BlockRef{};
    } else {
      ref = store(encode_node(l.entries, m_.format));
    }
  }
  if (level + 1 < m_.depth) {
    Level& p = levels_[level + 1];
    auto& slot = p.entries[static_cast<uint64_t>(l.index) % kFanout];
    if (!(slot == ref)) {
      slot = ref;
      p.dirty = true;
    }
  } else {
    m_.root = ref;
  }
  l.index = -1;
}

BlockDigest PointWriter::digest(std::span<const std::byte> data) const {
  BlockDigest d;
  d.zero = all_zero(data);
  if (d.zero) return d;
  d.hash = hash_bytes(data);
  if (repo_->format() >= 2) d.id = block_id(repo_->id_key(), data);
  return d;
}

void PointWriter::put_block(uint64_t block, std::span<const std::byte> data, const BlockDigest& d) {
  if (committed_) throw std::logic_error("put_block after commit");
  if (block >= nblocks_) throw UsageError("block " + std::to_string(block) + " is beyond the end of the disk");
  if (static_cast<int64_t>(block) <= last_block_) throw std::logic_error("blocks must be given in increasing order");
  if (data.size() != kBlockSize) throw std::logic_error("put_block wants exactly one block");
  last_block_ = static_cast<int64_t>(block);
  ensure(0, block / kFanout);
  Level& leaf = levels_[0];
  BlockRef& slot = leaf.entries[block % kFanout];
  if (d.zero) {
    if (!slot.is_zero()) {
      slot = BlockRef{};
      leaf.dirty = true;
      --blocks_allocated_;
    }
    return;
  }
  if (slot.is_zero()) ++blocks_allocated_;
  if (store_) {
    put_block_v2(slot, block, data, d);
    return;
  }
  if (!slot.is_zero() && slot.hash == d.hash) {
    compare_later(block, slot, data);  // probably unchanged since the parent
    return;
  }
  store_block(block, Bytes(data.begin(), data.end()), d.hash);
}

void PointWriter::put_block_v2(BlockRef& slot, uint64_t block, std::span<const std::byte> data,
                               const BlockDigest& d) {
  const BlockId& id = d.id;
  if (!slot.is_zero() && slot.id == id) return;  // unchanged since the parent: a keyed hash is proof
  if (pending_ids_.count(id)) drain(0);  // a repeat of a block still being compressed: store it once
  auto found = store_->find(id);
  if (found.ref) {
    slot = *found.ref;
    levels_[0].dirty = true;
    return;
  }
  if (found.in_flight) {
    levels_[0].dirty = true;
    pending_.push_back({block, id, {}, std::move(found.in_flight), Bytes(data.begin(), data.end())});
    drain(kMaxPending);
    return;
  }
  store_block(block, Bytes(data.begin(), data.end()), d.hash, id);
}

void PointWriter::store_block(uint64_t block, Bytes&& data, uint64_t hash, const BlockId& id) {
  // The slot is filled in by drain(), in order, once compressed.
  levels_[0].dirty = true;
  ++blocks_written_;
  if (store_) pending_ids_.insert(id);
  bool compress = raw_run_ < kRawRun || ++untried_ >= kProbeEvery;
  if (compress) untried_ = 0;
  pending_.push_back(
      {block, id, pool_->submit(std::move(data), hash, id, repo_->sealer(), compress), std::nullopt, {}, compress});
  drain(kMaxPending);
}

// XXH3-64 is a checksum, not a cryptographic hash: a guest can write a
// block that hashes like the one before it, and its backup would keep the
// old bytes. Equal checksums only pick the blocks worth comparing; the
// bytes decide. Reading the parent's records back costs a pass over them:
// runs of them that lie together in a pack are read in one piece (one
// request on S3, not one per block), gaps up to kMaxGap included.
void PointWriter::compare_later(uint64_t block, const BlockRef& parent, std::span<const std::byte> data) {
  constexpr uint64_t kMaxGap = 1 << 20, kMaxSpan = 8 << 20;
  if (!candidates_.empty()) {
    const BlockRef& first = candidates_.front().parent;
    const BlockRef& last = candidates_.back().parent;
    uint64_t last_end = last.offset + last.length();
    bool joins = parent.pack == first.pack && parent.offset >= last_end && parent.offset - last_end <= kMaxGap &&
                 parent.offset + parent.length() - first.offset <= kMaxSpan;
    if (!joins) compare_candidates();
  }
  candidates_.push_back({block, parent, Bytes(data.begin(), data.end())});
}

void PointWriter::compare_candidates() {
  if (candidates_.empty()) return;
  const BlockRef& first = candidates_.front().parent;
  uint64_t start = first.offset, end = candidates_.back().parent.offset + candidates_.back().parent.length();
  Bytes stored(end - start);
  bool readable = start >= pack_header_size(1);
  try {
    if (readable) repo_->storage().read(layout::pack_key(vdi_, first.pack), start, stored);
  } catch (const FormatError&) {  // a truncated pack: what it lost is written anew
    readable = false;
  } catch (const StorageError& e) {
    if (e.error_number() != ENOENT) throw;
    readable = false;
  }
  for (auto& c : candidates_) {
    // A damaged or unreadable parent block is replaced, not kept.
    bool same = readable && c.parent.length() <= kBlockSize + 1024 &&
                record_equals({stored.data() + (c.parent.offset - start), c.parent.length()}, c.parent, c.data,
                              compare_);
    if (!same) store_block(c.block, std::move(c.data), c.parent.hash);
  }
  candidates_.clear();
}

void PointWriter::start_new_chain(const std::string& reason) {
  if (last_block_ >= 0 || committed_) throw std::logic_error("start_new_chain after blocks were given");
  parent_ = nullptr;
  m_.parent = 0;
  m_.chain = m_.seq;
  m_.root = BlockRef{};
  m_.chain_reason = reason;
  blocks_allocated_ = 0;
}

void PointWriter::set_source(const std::string& snapshot_uuid, int64_t time) {
  m_.snapshot_uuid = snapshot_uuid;
  m_.time = std::max(time, latest_time_ == INT64_MIN ? time : latest_time_ + 1);
}

void PointWriter::put_zeros(uint64_t first, uint64_t end) {
  if (committed_) throw std::logic_error("put_zeros after commit");
  end = std::min(end, nblocks_);
  if (first >= end) return;
  if (static_cast<int64_t>(first) <= last_block_) throw std::logic_error("blocks must be given in increasing order");
  last_block_ = static_cast<int64_t>(end - 1);
  for (uint64_t b = first; b < end;) {
    uint64_t leaf_end = std::min(end, (b / kFanout + 1) * kFanout);
    ensure(0, b / kFanout);
    Level& leaf = levels_[0];
    if (!leaf.old_ref.is_zero() || leaf.dirty) {
      for (; b < leaf_end; ++b) {
        BlockRef& slot = leaf.entries[b % kFanout];
        if (!slot.is_zero()) {
          slot = BlockRef{};
          leaf.dirty = true;
          --blocks_allocated_;
        }
      }
    }
    b = leaf_end;
  }
}

uint64_t PointWriter::bytes_written() const {
  if (store_) return store_->bytes_written();
  return pack_ ? pack_->size() : 0;
}

uint64_t PointWriter::records_deduplicated() const { return store_ ? store_->records_deduplicated() : 0; }

Manifest PointWriter::commit() {
  if (committed_) throw std::logic_error("commit twice");
  for (uint32_t level = 0; level < m_.depth; ++level)
    if (levels_[level].index >= 0) finish(level);
  m_.blocks_written = blocks_written_;
  m_.blocks_allocated = blocks_allocated_;
  // On S3 the lock is a lease: it is renewed right before each step that
  // makes something visible, so no other writer can have taken it over.
  if (pack_) {
    m_.pack = m_.seq;
    m_.bytes_stored = pack_->size();
    lock_->check();
    pack_->commit();
  }
  if (store_) {
    m_.bytes_stored = store_->bytes_written();
    m_.packs = store_->commit();
  }
  lock_->check();
  repo_->storage().put(layout::point_key(vdi_, m_.seq), repo_->encode_point(m_));
  committed_ = true;
  try {
    lock_->check();
    write_point_list(*repo_, vdi_);
  } catch (const std::exception&) {
    // The point is committed. A list that lags behind takes it for one
    // committed after it was written, which it is; the next writer's
    // list names it.
  }
  if (store_) {
    try {
      store_->release_uses();
    } catch (const StorageError&) {
      // The point is committed; names left in uses/ only keep their packs
      // from a collection until the VDI's next writer clears them.
    }
  }
  return m_;
}

}  // namespace cbtfs
