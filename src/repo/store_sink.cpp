#include "store_sink.hpp"

#include <openssl/rand.h>

#include <stdexcept>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "dedup_index.hpp"

namespace cbtfs {

// Random, so that writers of different VDIs need no agreement on names; the
// storage refuses to commit over an existing name, should two ever meet.
uint64_t random_store_id() {
  uint64_t v = 0;
  while (v == 0)
    if (RAND_bytes(reinterpret_cast<unsigned char*>(&v), sizeof v) != 1) throw std::runtime_error("no random bytes");
  return v;
}

StoreSink::~StoreSink() = default;

void StoreSink::append(BlockRef& ref, Bytes&& stored, const std::function<void(uint64_t)>& name,
                       const std::function<void()>& before_visible) {
  std::lock_guard g(mu_);
  if (pack_ && pack_->size() + stored.size() > kStorePackCap) close(before_visible);
  if (!pack_) {
    // Named before it exists: a collection that sees the half-written pack
    // of a live writer also sees its name, and leaves it alone.
    uint64_t id = random_store_id();
    name(id);
    pack_ = storage_.create(layout::store_pack_key(id));
    pack_id_ = id;
    pack_->append(encode_pack_header(pack_id_, 2));
  }
  name(pack_id_);
  ref.pack = pack_id_;
  ref.offset = pack_->size();
  pack_->append(std::move(stored));
  entries_.push_back(ref);
  if (stored_.size() < kMaxStored) stored_.emplace(ref.id, ref);
  if (auto it = in_flight_.find(ref.id); it != in_flight_.end()) {
    it->second->ref.set_value(ref);
    in_flight_.erase(it);
  }
}

std::optional<BlockRef> StoreSink::find(const BlockId& id) {
  std::lock_guard g(mu_);
  if (auto it = stored_.find(id); it != stored_.end()) return it->second;
  return std::nullopt;
}

StoreSink::Claim StoreSink::find_or_claim(const BlockId& id, const void* claimant) {
  std::lock_guard g(mu_);
  if (auto it = stored_.find(id); it != stored_.end()) return {it->second, std::nullopt};
  if (auto it = in_flight_.find(id); it != in_flight_.end()) return {std::nullopt, it->second->future};
  auto p = std::make_unique<Promised>();
  p->future = p->ref.get_future().share();
  p->claimant = claimant;
  in_flight_.emplace(id, std::move(p));
  return {};
}

// Dropping the promise breaks it: whoever waits gets broken_promise.
void StoreSink::abandon(const BlockId& id, const void* claimant) {
  std::lock_guard g(mu_);
  if (auto it = in_flight_.find(id); it != in_flight_.end() && it->second->claimant == claimant) in_flight_.erase(it);
}

void StoreSink::forget_committed() {
  std::lock_guard g(mu_);
  std::erase_if(stored_, [&](const auto& kv) { return !pack_ || kv.second.pack != pack_id_; });
}

void StoreSink::make_durable(const std::set<uint64_t>& packs, const std::function<void()>& before_visible) {
  std::lock_guard g(mu_);
  for (uint64_t p : packs)
    if (failed_.count(p)) throw StorageError("a pack this point needs could not be committed", EIO);
  if (pack_ && packs.count(pack_id_)) close(before_visible);
}

// The pack first: an index entry must never name a record that is not there.
void StoreSink::close(const std::function<void()>& before_visible) {
  if (!pack_) return;
  try {
    before_visible();
    pack_->commit();
  } catch (...) {
    // Nobody may reference its records any more: the points that did fail
    // at make_durable, the others store those blocks again.
    failed_.insert(pack_id_);
    std::erase_if(stored_, [&](const auto& kv) { return kv.second.pack == pack_id_; });
    pack_.reset();
    entries_.clear();
    throw;
  }
  pack_.reset();
  before_visible();
  storage_.put(layout::store_index_key(pack_id_), encode_index_segment(std::move(entries_), pack_id_));
  entries_.clear();
}

}  // namespace cbtfs
