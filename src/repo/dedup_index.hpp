// The dedup index of a format 2 repository: which records the shared store
// holds, by block id. It is a set of immutable sorted segments, one per
// pack (store/index/<pack>.idx), each 4 KiB pages of 85 entries (an entry
// is a format 2 reference, 48 bytes) with a checksum per page, and the
// first id of every page at the end. A reader keeps only those first ids:
// 16 bytes per 85 entries, about 40 MiB for 10 TiB of 64 KiB blocks.
//
// The index is a hint for writers and nothing else: a lookup that misses
// (a damaged page, a segment written since it was opened) costs a second
// copy of a block, never a wrong one, and nothing reads data through it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/lru_cache.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs {

inline constexpr uint32_t kIndexPageSize = 4096;
inline constexpr uint32_t kIndexPageEntries = 85;  // 85 * 48 = 4080, then a checksum

// A segment's bytes for entries (any order; sorted here), indexing `pack`.
Bytes encode_index_segment(std::vector<BlockRef> entries, uint64_t pack);

// How many entries the segment at key holds (nullopt: missing or damaged).
std::optional<uint64_t> index_segment_count(Storage& storage, const std::string& key);

// The pack a segment indexes (0: a merged one), nullopt if it is missing
// or its header is damaged.
std::optional<uint64_t> index_segment_pack(Storage& storage, const std::string& key);

// Every entry of the segment at key, each page checked; `pack` gets the
// pack it indexes (0: a merged segment, made by a collection, of many
// packs). Throws FormatError naming the damage.
std::vector<BlockRef> read_index_segment(Storage& storage, const std::string& key, uint64_t& pack);

class DedupIndex {
 public:
  // Reads the first ids of every segment there is now. A damaged segment
  // is left out (and said in warnings()).
  explicit DedupIndex(Storage& storage);
  std::optional<BlockRef> find(const BlockId& id);
  size_t segments() const { return segments_.size(); }
  const std::vector<std::string>& warnings() const { return warnings_; }

 private:
  struct Segment {
    std::string key;
    uint64_t count = 0;
    std::vector<BlockId> fences;  // first id of each page
  };
  void open_segment(const std::string& key);
  std::shared_ptr<const Bytes> page(size_t segment, uint64_t page);

  Storage& storage_;
  std::vector<Segment> segments_;
  std::vector<std::string> warnings_;
  std::mutex mu_;
  struct PageKey {
    size_t segment;
    uint64_t page;
    bool operator==(const PageKey&) const = default;
  };
  struct PageKeyHash {
    size_t operator()(const PageKey& k) const noexcept { return std::hash<uint64_t>()(k.page * 1000003 + k.segment); }
  };
  LruCache<PageKey, Bytes, PageKeyHash> pages_{256};  // 1 MiB
};

}  // namespace cbtfs
