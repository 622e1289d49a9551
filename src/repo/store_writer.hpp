// How a format 2 point writer puts records into the shared block store:
// through the process's StoreSink (packs of at most kStorePackCap bytes
// under random ids, shared with the other points this process writes at the
// same time, each committed with the index segment of its records); and
// whether a record is stored already, from what this process stored and
// from the dedup index.
//
// The collector (gc.hpp) must never free a record this writer is about to
// reference. So every pack the writer relies on (one it appends to, one
// whose records it reuses) is named in vdis/<vdi>/uses/ before it is relied
// on, and a reused pack is relied on only if, once it is named there, no
// collection is freeing records and none has finished since the writer
// started looking records up (what it saw before may have been freed); the
// collector reads those names after it marks itself as freeing, and leaves
// their packs alone.
#pragma once

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <set>
#include <unordered_map>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/repository.hpp"
#include "dedup_index.hpp"

namespace cbtfs {

class StoreSink;

class StoreWriter {
 public:
  // Holds the VDI's lock (the uses/ names of a dead writer are cleared).
  // before_visible runs right before anything becomes visible (the lock's
  // check: a writer whose lease was taken over must not publish).
  StoreWriter(Repository& repo, const std::string& vdi, std::function<void()> before_visible);
  ~StoreWriter();  // abandons the claims of records never appended
  // What is known of a record with this id: one stored already; or one
  // another point of this process is compressing (wait, then adopt() it);
  // or neither, and the caller now has the claim to store it (append it,
  // or the claim is abandoned when this writer goes).
  struct Found {
    std::optional<BlockRef> ref;
    std::optional<std::shared_future<BlockRef>> in_flight;
  };
  Found find(const BlockId& id);
  // A record another point of this process appended, if it may be relied on.
  std::optional<BlockRef> adopt(const BlockRef& ref);
  // Appends an encoded record whose ref has its id, length and hash; sets
  // its pack and offset.
  void append(BlockRef& ref, Bytes&& stored);
  // Makes every pack this point references durable and visible; returns
  // the packs it appended to.
  std::vector<uint64_t> commit();
  // After the point's manifest is committed: its records are referenced
  // by a manifest now, so the uses/ names can go.
  void release_uses();
  uint64_t bytes_written() const { return bytes_; }
  uint64_t records_deduplicated() const { return deduplicated_; }

 private:
  // Names the pack in uses/ (once); for a pack of others' records, whether
  // it may be relied on.
  bool rely_on(uint64_t pack, bool own);

  Repository& repo_;
  StoreSink& sink_;  // the repository's, looked up once: every block goes through it
  std::string vdi_;
  std::function<void()> before_visible_;
  std::unique_ptr<DedupIndex> index_;  // opened at the first miss in the process's own records
  std::unordered_map<uint64_t, bool> relied_;  // pack -> may be relied on
  uint32_t uses_written_ = 0;
  std::string gc_seen_;  // store/gc/last when the lookups started
  std::set<BlockId> claims_;  // claimed in the sink, not appended yet
  std::set<uint64_t> from_sink_;  // packs of this process the point references: made durable at commit
  std::vector<uint64_t> appended_;
  uint64_t bytes_ = 0;
  uint64_t deduplicated_ = 0;
};

}  // namespace cbtfs
