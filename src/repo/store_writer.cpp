#include "store_writer.hpp"

#include <algorithm>

#include "cbtfs/layout.hpp"
#include "store_sink.hpp"

namespace cbtfs {

namespace {
std::string last_collection(Storage& st) {
  auto b = st.get(layout::kGcLastKey);
  return b ? std::string(reinterpret_cast<const char*>(b->data()), b->size()) : std::string();
}
}  // namespace

StoreWriter::StoreWriter(Repository& repo, const std::string& vdi, std::function<void()> before_visible)
    : repo_(repo), sink_(repo.store_sink()), vdi_(vdi), before_visible_(std::move(before_visible)) {
  release_uses();
  gc_seen_ = last_collection(repo_.storage());
  // What the process stored before a collection that finished since may
  // be gone; what it stores from now on is named in uses/ first.
  if (repo_.store_sink_collection() != gc_seen_) {
    sink_.forget_committed();
    repo_.set_store_sink_collection(gc_seen_);
  }
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
  // landed, and one that finished since the lookups started may have freed
  // what they found: in either case the pack is not trusted for the rest of
  // this run, and what was looked up is looked up afresh. A pack being
  // appended to is not committed yet, so no collection has listed it.
  bool ok = true;
  if (!own) {
    bool sweeping = st.size(layout::kGcSweepingKey).has_value();
    std::string last = last_collection(st);
    ok = !sweeping && last == gc_seen_;
    if (!ok) {
      index_.reset();
      if (!sweeping) {
        sink_.forget_committed();
        repo_.set_store_sink_collection(last);
        gc_seen_ = last;
      }
    }
  }
  relied_.emplace(pack, ok);
  return ok;
}

StoreWriter::~StoreWriter() {
  for (auto& id : claims_) sink_.abandon(id, this);
}

StoreWriter::Found StoreWriter::find(const BlockId& id) {
  if (auto r = sink_.find(id)) return {adopt(*r), std::nullopt};
  if (!index_) index_ = std::make_unique<DedupIndex>(repo_.storage());
  if (auto r = index_->find(id)) {
    if (!rely_on(r->pack, false)) return {};  // stored anew, unclaimed
    ++deduplicated_;
    return {r, std::nullopt};
  }
  auto c = sink_.find_or_claim(id, this);
  if (c.stored) return {adopt(*c.stored), std::nullopt};
  if (c.in_flight) return {std::nullopt, c.in_flight};
  claims_.insert(id);
  return {};
}

std::optional<BlockRef> StoreWriter::adopt(const BlockRef& ref) {
  if (!rely_on(ref.pack, false)) return std::nullopt;
  from_sink_.insert(ref.pack);
  ++deduplicated_;
  return ref;
}

void StoreWriter::append(BlockRef& ref, Bytes&& stored) {
  bytes_ += stored.size();
  sink_.append(
      ref, std::move(stored), [this](uint64_t pack) { rely_on(pack, true); }, before_visible_);
  claims_.erase(ref.id);
  from_sink_.insert(ref.pack);
  if (std::find(appended_.begin(), appended_.end(), ref.pack) == appended_.end()) appended_.push_back(ref.pack);
}

std::vector<uint64_t> StoreWriter::commit() {
  sink_.make_durable(from_sink_, before_visible_);
  return appended_;
}

}  // namespace cbtfs
