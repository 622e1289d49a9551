#include "store_writer.hpp"

#include <openssl/rand.h>

#include <cstring>
#include <stdexcept>

#include "cbtfs/layout.hpp"

namespace cbtfs {

namespace {

// Random, so that writers of different VDIs need no agreement on names; the
// storage refuses to commit over an existing name, should two ever meet.
uint64_t random_pack_id() {
  uint64_t v = 0;
  while (v == 0)
    if (RAND_bytes(reinterpret_cast<unsigned char*>(&v), sizeof v) != 1) throw std::runtime_error("no random bytes");
  return v;
}

}  // namespace

StoreWriter::StoreWriter(Repository& repo, const std::string& vdi, std::function<void()> before_visible)
    : repo_(repo), vdi_(vdi), before_visible_(std::move(before_visible)) {
  release_uses();
}

void StoreWriter::release_uses() {
  auto& st = repo_.storage();
  for (auto& n : st.list(layout::uses_dir(vdi_))) st.remove(layout::uses_dir(vdi_) + "/" + n);
  st.remove_temporaries(layout::uses_dir(vdi_));
  uses_written_ = 0;
}

bool StoreWriter::rely_on(uint64_t pack, bool own) {
  if (auto it = relied_.find(pack); it != relied_.end()) return it->second;
  auto& st = repo_.storage();
  std::string text = std::to_string(pack) + "\n";
  st.put(layout::uses_key(vdi_, ++uses_written_), std::as_bytes(std::span(text)));
  // A collection freeing records now may have read uses/ before this name
  // landed: its packs cannot be trusted for the rest of this run.
  bool ok = own || !st.size(layout::kGcSweepingKey);
  relied_.emplace(pack, ok);
  return ok;
}

std::optional<BlockRef> StoreWriter::find(const BlockId& id) {
  if (auto it = own_.find(id); it != own_.end()) {
    ++deduplicated_;
    return it->second;
  }
  if (!index_) index_ = std::make_unique<DedupIndex>(repo_.storage());
  auto r = index_->find(id);
  if (!r || !rely_on(r->pack, false)) return std::nullopt;
  ++deduplicated_;
  return r;
}

void StoreWriter::append(BlockRef& ref, Bytes&& stored) {
  if (pack_ && pack_->size() + stored.size() > kStorePackCap) close_pack();
  if (!pack_) {
    pack_id_ = random_pack_id();
    rely_on(pack_id_, true);
    pack_ = repo_.storage().create(layout::store_pack_key(pack_id_));
    pack_->append(encode_pack_header(pack_id_, 2));
  }
  ref.pack = pack_id_;
  ref.offset = pack_->size();
  pack_->append(std::move(stored));
  entries_.push_back(ref);
  if (own_.size() < kMaxOwn) own_.emplace(ref.id, ref);
}

// The pack first: an index entry must never name a record that is not there.
void StoreWriter::close_pack() {
  if (!pack_) return;
  before_visible_();
  closed_bytes_ += pack_->size();
  pack_->commit();
  pack_.reset();
  packs_.push_back(pack_id_);
  before_visible_();
  repo_.storage().put(layout::store_index_key(pack_id_), encode_index_segment(std::move(entries_), pack_id_));
  entries_.clear();
}

std::vector<uint64_t> StoreWriter::commit() {
  close_pack();
  return packs_;
}

uint64_t StoreWriter::bytes_written() const { return closed_bytes_ + (pack_ ? pack_->size() : 0); }

}  // namespace cbtfs
