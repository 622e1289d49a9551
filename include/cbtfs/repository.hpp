// The backup repository: VDIs, their points, and the record store below them.
//
// Layout (see cbtfs-format(5)):
//   cbtfs-repository                  header: format name and version
//   vdis/<uuid>/points/<seq>.point    one manifest per committed point
//   vdis/<uuid>/packs/<seq>.pack      the records (data blocks, index nodes) it added
//   vdis/<uuid>/lock                  the writer lock
// A point exists exactly when its manifest exists; the manifest is written
// last, after its pack is durable. Anything else is invisible garbage that the
// next writer of that VDI removes.
#pragma once

#include <climits>
#include <cstdint>
#include <deque>
#include <future>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/lru_cache.hpp"
#include "cbtfs/storage.hpp"
#include "cbtfs/encoder_pool.hpp"

namespace cbtfs {

using ManifestPtr = std::shared_ptr<const Manifest>;

struct PointList {
  std::vector<ManifestPtr> points;  // by seq, oldest first
  std::vector<std::string> errors;  // manifests that could not be read
};

// A cached record is known by where it is and by its checksum: a place
// that ever held other bytes can never answer for them.
struct RecordKey {
  const void* vdi;  // interned per VDI by the Repository
  uint32_t pack;
  uint64_t offset;
  uint64_t hash;
  bool operator==(const RecordKey&) const = default;
};
struct RecordKeyHash {
  size_t operator()(const RecordKey& k) const noexcept {
    return std::hash<const void*>()(k.vdi) ^ (std::hash<uint64_t>()(k.offset) * 31 + k.pack) ^ k.hash;
  }
};

class Repository {
 public:
  // Creates the repository directory (mode 0700) and its header.
  static void init(const std::string& path);
  // Opens and checks the header; throws FormatError/VersionError/StorageError.
  static std::shared_ptr<Repository> open(const std::string& path);
  // The same over a storage already opened (the mount puts a cache in front).
  static std::shared_ptr<Repository> open(std::unique_ptr<Storage> storage);
  explicit Repository(std::unique_ptr<Storage> storage, std::string id = "");

  Storage& storage() { return *storage_; }
  // The uuid from the header ("" for repositories created without one).
  const std::string& id() const { return id_; }
  std::vector<std::string> vdis();
  bool has_vdi(const std::string& vdi);
  // Manifests are immutable, so they are parsed once and kept.
  PointList points(const std::string& vdi);
  ManifestPtr latest(const std::string& vdi);
  // nullptr when the point does not exist; throws FormatError when damaged.
  ManifestPtr manifest(const std::string& vdi, uint32_t seq);

  // Reads and verifies one record. Index nodes are cached (they are few and
  // hot); data blocks go through a small cache for small random reads.
  // keep=false: a one-off read (a scan of many points) that would only push
  // hot nodes out; it still uses a node already cached.
  std::shared_ptr<const Bytes> node(const std::string& vdi, const BlockRef& ref, bool keep = true);
  void read_block(const std::string& vdi, const BlockRef& ref, std::span<std::byte> out, bool cache);

  static std::string point_key(const std::string& vdi, uint32_t seq);
  static std::string pack_key(const std::string& vdi, uint32_t pack);
  static std::string lock_key(const std::string& vdi);
  static std::string journal_key(const std::string& vdi);
  // vdis/<uuid>/forgotten/<seq>: left by forget, so that the VDI's next
  // point numbers start above every number it ever used.
  static std::string forgotten_key(const std::string& vdi, uint32_t seq);
  // Registers a reader of the point (a claim on its manifest) until the
  // returned claim goes: prune keeps a point that is being read. nullptr
  // when the point is gone or being removed.
  std::unique_ptr<Claim> hold_point(const Manifest& m);
  // The highest point number the VDI has ever used (0: none).
  uint32_t highest_seq(const std::string& vdi);

  // A small text a writer keeps beside a VDI's points while it holds the
  // VDI's lock: what the next writer must clean up should this one die.
  // Opaque to the repository; durable when put_journal returns.
  void put_journal(const std::string& vdi, const std::string& text);
  std::optional<std::string> journal(const std::string& vdi);
  void clear_journal(const std::string& vdi);

  // The VDI's writer lock, held until the returned object goes; throws
  // LockedError naming the holder. holder says who we are (see holder_text).
  std::unique_ptr<StorageLock> lock_vdi(const std::string& vdi, const std::string& holder);

  // Drops cached manifests of points that no longer exist (after prune).
  void forget_point(const std::string& vdi, uint32_t seq);

 private:
  const void* intern(const std::string& vdi);
  void read_record(const std::string& vdi, const BlockRef& ref, std::span<std::byte> out);

  std::unique_ptr<Storage> storage_;
  std::string id_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<std::string>> interned_;
  std::map<std::pair<std::string, uint32_t>, ManifestPtr> manifests_;
  LruCache<RecordKey, Bytes, RecordKeyHash> nodes_{1024};   // 24 MiB at most
  LruCache<RecordKey, Bytes, RecordKeyHash> blocks_{64};    // 4 MiB
};

// "<program>, pid N on HOST": what a second writer is told about the first.
std::string holder_text(const std::string& program);

// Random access to one point as a raw disk image. Thread-safe.
class PointReader {
 public:
  // keep_cached=false for a one-off look at many points (the partition
  // tables of a listing): what it reads stays out of the repository's caches.
  PointReader(std::shared_ptr<Repository> repo, ManifestPtr point, bool keep_cached = true);
  uint64_t size() const { return point_->virtual_size; }
  const Manifest& point() const { return *point_; }
  // Reads min(out.size(), size()-offset) bytes; returns the count.
  // Throws CorruptError naming the block when a record fails its checksum.
  size_t read(uint64_t offset, std::span<std::byte> out);
  BlockRef lookup(uint64_t block);
  // The first offset >= offset that holds data (or is a hole); size() if none.
  uint64_t next_data(uint64_t offset);
  uint64_t next_hole(uint64_t offset);
  // Blocks holding data among [first, end): skips zero subtrees, so it
  // costs the index nodes of the data that is there, not the disk's size.
  uint64_t allocated_blocks(uint64_t first, uint64_t end);

 private:
  std::shared_ptr<Repository> repo_;
  ManifestPtr point_;
  bool keep_cached_;
};

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
  void put_block(uint64_t block, std::span<const std::byte> data);
  // Blocks [first, end) are all zero. Cheap where the parent has nothing
  // there either: a sparse 1 TiB disk costs one pass over its leaves.
  void put_zeros(uint64_t first, uint64_t end);
  // Makes the point durable and visible; returns its manifest.
  Manifest commit();

  uint64_t blocks_written() const { return blocks_written_; }
  uint64_t bytes_written() const;

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
  void store_block(uint64_t block, Bytes&& data, uint64_t hash);

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
  struct Pending {
    uint64_t block;
    std::future<EncoderPool::Encoded> encoded;
  };
  void drain(size_t keep);
  void append(BlockRef& ref, Bytes& stored);

  std::shared_ptr<Repository> repo_;
  std::string vdi_;
  std::unique_ptr<StorageLock> lock_;
  std::unique_ptr<EncoderPool> pool_;
  std::deque<Pending> pending_;
  PointInfo info_;
  ManifestPtr parent_;
  int64_t latest_time_ = INT64_MIN;
  Manifest m_;
  uint64_t nblocks_ = 0;
  int64_t last_block_ = -1;
  std::vector<Level> levels_;
  std::unique_ptr<ObjectWriter> pack_;
  std::vector<Candidate> candidates_;  // all in the loaded leaf, parent records in one pack, in order
  Bytes compare_;                      // a parent block decompressed to compare with
  uint64_t blocks_written_ = 0;
  uint64_t blocks_allocated_ = 0;  // of the point being built: the parent's, then each change
  bool committed_ = false;
};

}  // namespace cbtfs
