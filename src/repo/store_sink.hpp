// The open pack a process appends format 2 records to, shared by every point
// it writes at the same time (the parallel jobs of one ingest): a block one
// of them stored is found by the others before either commits, where the
// dedup index would show it only after (two first backups of clones running
// at once would otherwise both store the template).
#pragma once

#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs {

inline constexpr uint64_t kStorePackCap = uint64_t{128} << 20;

// A fresh name for a pack or a merged index segment.
uint64_t random_store_id();

class StoreSink {
 public:
  explicit StoreSink(Storage& storage) : storage_(storage) {}
  ~StoreSink();  // an open pack that no committed point needs is discarded

  // Appends an encoded record whose ref has its id, length and hash; sets
  // its pack and offset. name(pack) runs, under the sink's lock, before a
  // record of the caller first lands in a pack, so that the caller's uses/
  // name is there before anyone can commit that pack.
  void append(BlockRef& ref, Bytes&& stored, const std::function<void(uint64_t)>& name,
              const std::function<void()>& before_visible);
  // A record this process stored under id, in an open or committed pack.
  std::optional<BlockRef> find(const BlockId& id);
  // The same, and else: a record another point of this process is still
  // compressing (its ref once appended), or, when nobody is, a claim for
  // the caller, who must append the record or abandon() the claim. So the
  // first backups of two clones running at once store the template once.
  struct Claim {
    std::optional<BlockRef> stored;
    std::optional<std::shared_future<BlockRef>> in_flight;
  };
  Claim find_or_claim(const BlockId& id, const void* claimant);
  // The claimant will not append: its waiters store their own copy.
  void abandon(const BlockId& id, const void* claimant);
  // A collection finished since the records were stored: those in
  // committed packs may have been freed, so they are no longer offered.
  void forget_committed();
  // Commits the open pack (then its index segment) if it is one of packs:
  // what a point references is durable before its manifest.
  void make_durable(const std::set<uint64_t>& packs, const std::function<void()>& before_visible);

 private:
  void close(const std::function<void()>& before_visible);  // mu_ held

  // Bounded, so that a huge first backup does not grow it without end (a
  // repeat beyond is stored twice).
  static constexpr size_t kMaxStored = 1 << 20;

  Storage& storage_;
  std::mutex mu_;
  std::unique_ptr<ObjectWriter> pack_;
  uint64_t pack_id_ = 0;
  std::vector<BlockRef> entries_;  // of the open pack
  std::unordered_map<BlockId, BlockRef, BlockIdHash> stored_;
  struct Promised {
    std::promise<BlockRef> ref;
    std::shared_future<BlockRef> future;
    const void* claimant;
  };
  std::unordered_map<BlockId, std::unique_ptr<Promised>, BlockIdHash> in_flight_;
  std::set<uint64_t> failed_;  // packs whose commit failed: no point may reference them
};

}  // namespace cbtfs
