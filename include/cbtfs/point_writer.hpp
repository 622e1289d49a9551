// Writing one new point of one VDI.
#pragma once

#include <climits>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include "cbtfs/encoder_pool.hpp"
#include "cbtfs/format.hpp"
#include "cbtfs/repository.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs {

class StoreWriter;


// What a new point says about itself; everything else the writer derives.
struct PointInfo {
  int64_t time = 0;
  uint64_t virtual_size = 0;
  std::string vdi_name, vm_name, vm_uuid, snapshot_uuid;
  bool force_full = false;   // start a new chain even if the last point fits
  std::string chain_reason;  // said in ls when force_full
};

// Writes one new point of one VDI. Holds the VDI's writer lock from
// construction to destruction. Blocks are given in increasing order; a block
// never given keeps the parent's content (zero without a parent).
class PointWriter {
 public:
  // Throws LockedError if another writer holds the VDI, UsageError if the
  // time is not after the latest point's.
  PointWriter(std::shared_ptr<Repository> repo, const std::string& vdi, PointInfo info, const std::string& holder);
  ~PointWriter();
  PointWriter(const PointWriter&) = delete;
  PointWriter& operator=(const PointWriter&) = delete;

  // The point this one is a delta of, or nullptr for a full base.
  ManifestPtr parent() const { return parent_; }
  uint64_t block_count() const { return nblocks_; }
  // Drops the parent before any block is given: this point becomes a full
  // base of a new chain, for the reason shown in ls.
  void start_new_chain(const std::string& reason);
  // What is only known after the writer was set up (and locked): the
  // snapshot the point was read from, and its time (moved past the latest
  // point's if the clock says otherwise).
  void set_source(const std::string& snapshot_uuid, int64_t time);
  // data.size() == kBlockSize (the last block zero-padded).
  void put_block(uint64_t block, std::span<const std::byte> data) { put_block(block, data, digest(data)); }
  // d is digest(data), computed on any thread.
  void put_block(uint64_t block, std::span<const std::byte> data, const BlockDigest& d);
  // Safe to call from any thread while the writer works.
  BlockDigest digest(std::span<const std::byte> data) const;
  // Blocks [first, end) are all zero. Cheap where the parent has nothing
  // there either: a sparse 1 TiB disk costs one pass over its leaves.
  void put_zeros(uint64_t first, uint64_t end);
  // Makes the point durable and visible; returns its manifest.
  Manifest commit();

  uint64_t blocks_written() const { return blocks_written_; }
  uint64_t bytes_written() const;
  // Format 2: records found in the store instead of written again.
  uint64_t records_deduplicated() const;

 private:
  struct Level {
    int64_t index = -1;  // which node of this level is loaded
    BlockRef old_ref;    // what the parent pointed at before
    std::vector<BlockRef> entries;
    bool dirty = false;
  };
  uint32_t clean_leftovers();  // returns the highest point or pack number ever used
  void ensure(uint32_t level, uint64_t index);
  void finish(uint32_t level);
  BlockRef store(std::span<const std::byte> plain);
  std::vector<BlockRef> load_node(const BlockRef& ref);
  void store_block(uint64_t block, Bytes&& data, uint64_t hash, const BlockId& id = {});
  // Format 2: a block that differs from the parent's, by its id.
  void put_block_v2(BlockRef& slot, uint64_t block, std::span<const std::byte> data, const BlockDigest& d);

  // A block whose checksum equals the parent's is compared with the
  // parent's bytes before it counts as unchanged; such blocks wait here
  // so that a run of them is read back with one storage read.
  struct Candidate {
    uint64_t block;
    BlockRef parent;
    Bytes data;
  };
  void compare_later(uint64_t block, const BlockRef& parent, std::span<const std::byte> data);
  void compare_candidates();

  // Blocks being compressed, oldest first; drained before their leaf is
  // finished and whenever too many are in flight.
  // Format 2 also queues blocks another point of this process is
  // compressing: `waiting` gives that record's ref; `data` is kept in case
  // it never comes.
  struct Pending {
    uint64_t block;
    BlockId id;  // format 2
    std::future<EncoderPool::Encoded> encoded;
    std::optional<std::shared_future<BlockRef>> waiting;
    Bytes data;
    bool compress = true;  // LZ4 was tried on it
  };
  void drain(size_t keep);
  void append_encoded(Pending& p);
  void append_own_pending();
  void settle(Pending& p);
  void append(BlockRef& ref, Bytes& stored);

  std::shared_ptr<Repository> repo_;
  std::string vdi_;
  std::unique_ptr<StorageLock> lock_;
  std::unique_ptr<EncoderPool> pool_;
  std::deque<Pending> pending_;
  std::unordered_set<BlockId, BlockIdHash> pending_ids_;  // format 2: repeats wait for the first copy
  PointInfo info_;
  ManifestPtr parent_;
  int64_t latest_time_ = INT64_MIN;
  Manifest m_;
  uint64_t nblocks_ = 0;
  int64_t last_block_ = -1;
  std::vector<Level> levels_;
  std::unique_ptr<ObjectWriter> pack_;     // format 1: this point's pack
  std::unique_ptr<StoreWriter> store_;     // format 2: the shared store
  std::vector<Candidate> candidates_;  // all in the loaded leaf, parent records in one pack, in order
  Bytes compare_;                      // a parent block decompressed to compare with
  uint64_t blocks_written_ = 0;
  // Incompressible data (compressed files, media, encrypted guest volumes)
  // comes in runs, and LZ4 tried on it costs a full ingest a tenth of its
  // CPU for nothing: after kRawRun blocks in a row that did not compress,
  // only every kProbeEvery-th is tried, until one does.
  static constexpr unsigned kRawRun = 16, kProbeEvery = 8;
  unsigned raw_run_ = 0;  // blocks tried in a row that did not compress
  unsigned untried_ = 0;  // blocks since the last one tried
  uint64_t blocks_allocated_ = 0;  // of the point being built: the parent's, then each change
  bool committed_ = false;
  bool patient_ = true;  // format 2: still waiting for other points' records
};

}  // namespace cbtfs
