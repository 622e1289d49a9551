#include "dedup_index.hpp"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"

namespace cbtfs {

namespace {

constexpr std::array<char, 8> kIndexMagic = {'C', 'B', 'T', 'F', 'S', 'I', 'X', '2'};
constexpr uint32_t kEntrySize = ref_size(2);
constexpr uint64_t kMaxEntries = uint64_t{1} << 32;

void put64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
uint64_t get64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{std::to_integer<uint8_t>(p[i])} << (8 * i);
  return v;
}
uint64_t checksum(const std::byte* p, size_t n) { return XXH3_64bits(p, n); }

uint64_t page_count(uint64_t entries) { return (entries + kIndexPageEntries - 1) / kIndexPageEntries; }

// Header page: magic, version u32, 0 u32, count u64, pages u64, pack u64,
// XXH3 of the 40 bytes before it.
Bytes encode_header(uint64_t count, uint64_t pages, uint64_t pack) {
  Bytes h(kIndexPageSize);
  std::memcpy(h.data(), kIndexMagic.data(), kIndexMagic.size());
  h[8] = std::byte{2};
  put64(h.data() + 16, count);
  put64(h.data() + 24, pages);
  put64(h.data() + 32, pack);
  put64(h.data() + 40, checksum(h.data(), 40));
  return h;
}

}  // namespace

Bytes encode_index_segment(std::vector<BlockRef> entries, uint64_t pack) {
  std::sort(entries.begin(), entries.end(), [](const BlockRef& a, const BlockRef& b) { return a.id < b.id; });
  entries.erase(std::unique(entries.begin(), entries.end(), [](const BlockRef& a, const BlockRef& b) { return a.id == b.id; }),
                entries.end());
  uint64_t pages = page_count(entries.size());
  Bytes out = encode_header(entries.size(), pages, pack);
  out.resize(kIndexPageSize * (1 + pages) + pages * sizeof(BlockId) + 8);
  std::byte* fences = out.data() + kIndexPageSize * (1 + pages);
  for (uint64_t p = 0; p < pages; ++p) {
    std::byte* page = out.data() + kIndexPageSize * (1 + p);
    size_t first = p * kIndexPageEntries, n = std::min<size_t>(kIndexPageEntries, entries.size() - first);
    for (size_t i = 0; i < n; ++i) encode_ref(entries[first + i], page + i * kEntrySize, 2);
    put64(page + kIndexPageEntries * kEntrySize, checksum(page, kIndexPageEntries * kEntrySize));
    std::memcpy(fences + p * sizeof(BlockId), entries[first].id.data(), sizeof(BlockId));
  }
  put64(fences + pages * sizeof(BlockId), checksum(fences, pages * sizeof(BlockId)));
  return out;
}

namespace {
std::optional<Bytes> segment_header(Storage& storage, const std::string& key) {
  Bytes h(48);
  try {
    storage.read(key, 0, h);
  } catch (const StorageError&) {
    return std::nullopt;
  } catch (const FormatError&) {
    return std::nullopt;
  }
  if (std::memcmp(h.data(), kIndexMagic.data(), kIndexMagic.size()) != 0 || get64(h.data() + 40) != checksum(h.data(), 40))
    return std::nullopt;
  return h;
}
}  // namespace

std::optional<uint64_t> index_segment_count(Storage& storage, const std::string& key) {
  auto h = segment_header(storage, key);
  if (!h) return std::nullopt;
  return get64(h->data() + 16);
}

std::optional<uint64_t> index_segment_pack(Storage& storage, const std::string& key) {
  auto h = segment_header(storage, key);
  if (!h) return std::nullopt;
  return get64(h->data() + 32);
}

std::vector<BlockRef> read_index_segment(Storage& storage, const std::string& key, uint64_t& pack) {
  std::string where = storage.describe() + "/" + key;
  auto size = storage.size(key);
  if (!size) throw StorageError(where + ": no such index segment", ENOENT);
  if (*size < kIndexPageSize) throw FormatError(where + ": truncated index segment");
  Bytes all(*size);
  storage.read(key, 0, all);
  if (std::memcmp(all.data(), kIndexMagic.data(), kIndexMagic.size()) != 0 ||
      get64(all.data() + 40) != checksum(all.data(), 40))
    throw FormatError(where + ": not an index segment, or a damaged one");
  uint64_t count = get64(all.data() + 16), pages = get64(all.data() + 24);
  pack = get64(all.data() + 32);
  if (count > kMaxEntries || pages != page_count(count) ||
      *size != kIndexPageSize * (1 + pages) + pages * sizeof(BlockId) + 8)
    throw FormatError(where + ": index segment sizes do not agree");
  std::vector<BlockRef> out;
  out.reserve(count);
  for (uint64_t p = 0; p < pages; ++p) {
    const std::byte* page = all.data() + kIndexPageSize * (1 + p);
    if (get64(page + kIndexPageEntries * kEntrySize) != checksum(page, kIndexPageEntries * kEntrySize))
      throw FormatError(where + ": damaged page " + std::to_string(p));
    uint64_t n = std::min<uint64_t>(kIndexPageEntries, count - p * kIndexPageEntries);
    for (uint64_t i = 0; i < n; ++i) out.push_back(decode_ref(page + i * kEntrySize, 2));
  }
  return out;
}

DedupIndex::DedupIndex(Storage& storage) : storage_(storage) {
  for (auto& dir_name : storage_.list(layout::kStoreIndexDir)) {
    if (!layout::parse_store_index_name(dir_name)) continue;
    std::string key = std::string(layout::kStoreIndexDir) + "/" + dir_name;
    try {
      open_segment(key);
    } catch (const FormatError& e) {
      warnings_.push_back(std::string(e.what()) + " (left out of deduplication)");
    } catch (const StorageError& e) {
      if (e.error_number() != ENOENT) throw;  // removed meanwhile: nothing to find there
    }
  }
}

void DedupIndex::open_segment(const std::string& key) {
  std::string where = storage_.describe() + "/" + key;
  auto size = storage_.size(key);
  if (!size) return;
  if (*size < kIndexPageSize) throw FormatError(where + ": truncated index segment");
  Bytes h(kIndexPageSize);
  storage_.read(key, 0, h);
  if (std::memcmp(h.data(), kIndexMagic.data(), kIndexMagic.size()) != 0 || get64(h.data() + 40) != checksum(h.data(), 40))
    throw FormatError(where + ": not an index segment, or a damaged one");
  if (std::to_integer<uint8_t>(h[8]) > kFormatVersion)
    throw FormatError(where + ": index segment of a newer format");
  Segment s;
  s.key = key;
  s.count = get64(h.data() + 16);
  uint64_t pages = get64(h.data() + 24);
  if (s.count == 0 || s.count > kMaxEntries || pages != page_count(s.count) ||
      *size != kIndexPageSize * (1 + pages) + pages * sizeof(BlockId) + 8)
    throw FormatError(where + ": index segment sizes do not agree");
  Bytes fences(pages * sizeof(BlockId) + 8);
  storage_.read(key, kIndexPageSize * (1 + pages), fences);
  if (get64(fences.data() + pages * sizeof(BlockId)) != checksum(fences.data(), pages * sizeof(BlockId)))
    throw FormatError(where + ": damaged page list");
  s.fences.resize(pages);
  for (uint64_t p = 0; p < pages; ++p) std::memcpy(s.fences[p].data(), fences.data() + p * sizeof(BlockId), sizeof(BlockId));
  if (!std::is_sorted(s.fences.begin(), s.fences.end())) throw FormatError(where + ": page list out of order");
  segments_.push_back(std::move(s));
}

std::shared_ptr<const Bytes> DedupIndex::page(size_t segment, uint64_t p) {
  PageKey k{segment, p};
  if (auto hit = pages_.get(k)) return hit;
  auto bytes = std::make_shared<Bytes>(kIndexPageSize);
  storage_.read(segments_[segment].key, kIndexPageSize * (1 + p), *bytes);
  if (get64(bytes->data() + kIndexPageEntries * kEntrySize) != checksum(bytes->data(), kIndexPageEntries * kEntrySize))
    return nullptr;  // damaged: a miss, and a second copy of the block
  pages_.put(k, bytes);
  return bytes;
}

std::optional<BlockRef> DedupIndex::find(const BlockId& id) {
  std::lock_guard g(mu_);
  for (size_t s = segments_.size(); s-- > 0;) {
    const auto& f = segments_[s].fences;
    auto it = std::upper_bound(f.begin(), f.end(), id);
    if (it == f.begin()) continue;
    uint64_t p = static_cast<uint64_t>(it - f.begin()) - 1;
    std::shared_ptr<const Bytes> bytes;
    try {
      bytes = page(s, p);
    } catch (const StorageError&) {
      continue;  // a segment removed since it was opened
    } catch (const FormatError&) {
      continue;
    }
    if (!bytes) continue;
    uint64_t n = std::min<uint64_t>(kIndexPageEntries, segments_[s].count - p * kIndexPageEntries);
    // Entries are sorted: binary search on the id at offset 32 of each.
    uint64_t lo = 0, hi = n;
    while (lo < hi) {
      uint64_t mid = (lo + hi) / 2;
      const std::byte* e = bytes->data() + mid * kEntrySize;
      int c = std::memcmp(e + 32, id.data(), id.size());
      if (c == 0) {
        BlockRef r = decode_ref(e, 2);
        if (r.is_zero() || r.length() == 0 || r.length() > kBlockSize + 1024) break;  // nonsense: a miss
        return r;
      }
      if (c < 0) lo = mid + 1;
      else hi = mid;
    }
  }
  return std::nullopt;
}

}  // namespace cbtfs
