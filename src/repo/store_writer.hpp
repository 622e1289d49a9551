// How a format 2 point writer puts records into the shared block store:
// packs of at most kStorePackCap bytes under random ids (writers of other
// VDIs write packs of their own at the same time), each followed by the
// index segment of its records; and whether a record is stored already,
// from the dedup index and from what this writer stored itself.
//
// The collector (gc.hpp) must never free a record this writer is about to
// reference. So every pack the writer relies on (one it writes, one whose
// records it reuses) is named in vdis/<vdi>/uses/ before it is relied on,
// and a reused pack is relied on only if no collection was freeing records
// when it was named there; the collector reads those names after it marks
// itself as freeing, and leaves their packs alone.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/repository.hpp"
#include "dedup_index.hpp"

namespace cbtfs {

inline constexpr uint64_t kStorePackCap = uint64_t{128} << 20;

class StoreWriter {
 public:
  // before_visible runs right before anything becomes visible (the lock's
  // check: a writer whose lease was taken over must not publish).
  // Holds the VDI's lock (the uses/ names of a dead writer are cleared).
  StoreWriter(Repository& repo, const std::string& vdi, std::function<void()> before_visible);
  // After the point's manifest is committed: its records are referenced
  // by a manifest now, so the uses/ names can go.
  void release_uses();
  // A record with this id that is stored already (committed, or written by
  // this writer), or nullopt.
  std::optional<BlockRef> find(const BlockId& id);
  // Appends an encoded record whose ref has its id, length and hash; sets
  // its pack and offset.
  void append(BlockRef& ref, Bytes&& stored);
  // Makes every pack written durable and visible, with its index segment;
  // returns their ids.
  std::vector<uint64_t> commit();
  uint64_t bytes_written() const;
  uint64_t records_deduplicated() const { return deduplicated_; }

 private:
  void close_pack();
  // Names the pack in uses/ (once); for a pack of others' records, whether
  // it may be relied on.
  bool rely_on(uint64_t pack, bool own);

  // What this writer stored, for repeats within its run; bounded so that a
  // huge first backup does not grow without end (a repeat beyond is stored twice).
  static constexpr size_t kMaxOwn = 1 << 20;

  Repository& repo_;
  std::string vdi_;
  std::function<void()> before_visible_;
  std::unordered_map<uint64_t, bool> relied_;  // pack -> may be relied on
  uint32_t uses_written_ = 0;
  std::unique_ptr<DedupIndex> index_;  // opened at the first find
  std::unique_ptr<ObjectWriter> pack_;
  uint64_t pack_id_ = 0;
  std::vector<BlockRef> entries_;  // of the open pack
  std::unordered_map<BlockId, BlockRef, BlockIdHash> own_;
  std::vector<uint64_t> packs_;
  uint64_t closed_bytes_ = 0;
  uint64_t deduplicated_ = 0;
};

}  // namespace cbtfs
