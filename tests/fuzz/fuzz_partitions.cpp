// Partition tables: the input is the start of a disk (zeros beyond it), its
// size chosen by the first bytes. Every partition found must lie on the
// disk, and numbers must be unique.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>

#include "mount/partitions.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  uint64_t disk_size = (uint64_t{data[0]} << 20 | uint64_t{data[1]} << 12) + size;
  const uint8_t* disk = data + 2;
  size_t have = size - 2;
  auto read = [&](uint64_t off, std::span<std::byte> out) {
    if (off + out.size() > disk_size) __builtin_trap();  // reads stay on the disk
    std::memset(out.data(), 0, out.size());
    if (off < have) std::memcpy(out.data(), disk + off, std::min<uint64_t>(out.size(), have - off));
  };
  std::set<uint32_t> numbers;
  for (auto& p : cbtfs::find_partitions(read, disk_size)) {
    if (p.size == 0 || p.offset + p.size > disk_size || p.offset % 512) __builtin_trap();
    if (!numbers.insert(p.number).second) __builtin_trap();
  }
  return 0;
}
