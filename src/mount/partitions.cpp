#include "partitions.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <set>

namespace cbtfs {

namespace {

constexpr uint64_t kSector = 512;
constexpr uint32_t kMaxGptEntries = 1024;
constexpr uint32_t kMaxLogical = 256;

uint32_t le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t le64(const std::byte* p) { return le32(p) | (uint64_t{le32(p + 4)} << 32); }

// A partition of [first, first + count) sectors, if it lies on the disk.
void add(std::vector<Partition>& out, uint32_t number, uint64_t first, uint64_t count, uint64_t disk_size,
         const char* scheme) {
  if (count == 0 || first == 0 || first > disk_size / kSector) return;
  uint64_t offset = first * kSector;
  uint64_t size = std::min(count * kSector, disk_size - offset);
  if (size) out.push_back({number, offset, size, scheme});
}

bool gpt(const DiskReader& read, uint64_t disk_size, std::vector<Partition>& out) {
  std::array<std::byte, kSector> h{};
  read(kSector, h);
  if (std::memcmp(h.data(), "EFI PART", 8) != 0) return false;
  uint64_t entries_lba = le64(h.data() + 72);
  uint32_t count = le32(h.data() + 80), entry_size = le32(h.data() + 84);
  if (entry_size < 128 || entry_size > 4096 || entry_size % 8 || count == 0 || count > kMaxGptEntries ||
      entries_lba < 2 || entries_lba > disk_size / kSector)
    return true;  // a GPT, but not one to trust: no partitions rather than wrong ones
  std::vector<std::byte> table(uint64_t{count} * entry_size);
  if (entries_lba * kSector + table.size() > disk_size) return true;
  read(entries_lba * kSector, table);
  for (uint32_t i = 0; i < count; ++i) {
    const std::byte* e = table.data() + uint64_t{i} * entry_size;
    static const std::array<std::byte, 16> unused{};
    if (std::memcmp(e, unused.data(), 16) == 0) continue;
    uint64_t first = le64(e + 32), last = le64(e + 40);
    if (last < first) continue;
    add(out, i + 1, first, last - first + 1, disk_size, "gpt");
  }
  return true;
}

bool extended(uint8_t type) { return type == 0x05 || type == 0x0f || type == 0x85; }

void mbr(const DiskReader& read, uint64_t disk_size, const std::byte* s, std::vector<Partition>& out) {
  uint64_t ext_start = 0;
  for (uint32_t i = 0; i < 4; ++i) {
    const std::byte* e = s + 446 + 16 * i;
    auto type = static_cast<uint8_t>(e[4]);
    uint64_t first = le32(e + 8), count = le32(e + 12);
    if (type == 0 || type == 0xee) continue;  // unused, or a GPT we could not read
    if (extended(type)) {
      if (!ext_start) ext_start = first;
      continue;  // a container, not a file system
    }
    add(out, i + 1, first, count, disk_size, "mbr");
  }
  // Logical partitions: a chain of extended boot records, each holding one
  // partition (relative to itself) and a link (relative to the extended one).
  std::set<uint64_t> seen;
  uint64_t ebr = ext_start;
  for (uint32_t n = 5; ebr && n < 5 + kMaxLogical && ebr < disk_size / kSector && seen.insert(ebr).second;) {
    std::array<std::byte, kSector> b{};
    read(ebr * kSector, b);
    if (static_cast<uint8_t>(b[510]) != 0x55 || static_cast<uint8_t>(b[511]) != 0xaa) break;
    const std::byte* part = b.data() + 446;
    const std::byte* link = part + 16;
    if (static_cast<uint8_t>(part[4]) != 0) add(out, n++, ebr + le32(part + 8), le32(part + 12), disk_size, "mbr");
    ebr = extended(static_cast<uint8_t>(link[4])) && le32(link + 8) ? ext_start + le32(link + 8) : 0;
  }
}

}  // namespace

std::vector<Partition> find_partitions(const DiskReader& read, uint64_t disk_size) {
  std::vector<Partition> out;
  if (disk_size < 2 * kSector) return out;
  std::array<std::byte, kSector> s{};
  read(0, s);
  if (static_cast<uint8_t>(s[510]) != 0x55 || static_cast<uint8_t>(s[511]) != 0xaa) return out;
  bool protective = false;
  for (uint32_t i = 0; i < 4; ++i) protective = protective || static_cast<uint8_t>(s[446 + 16 * i + 4]) == 0xee;
  if (!(protective && gpt(read, disk_size, out))) mbr(read, disk_size, s.data(), out);
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.number < b.number; });
  return out;
}

}  // namespace cbtfs
