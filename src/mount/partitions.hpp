// Partition tables of a disk image: GPT, and MBR with its extended chain of
// logical partitions. The table is data from the guest, so nothing in it is
// trusted: every offset is checked against the disk, loops are cut.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace cbtfs {

struct Partition {
  uint32_t number = 0;  // as Linux numbers them: GPT entry index + 1; MBR 1-4, logical 5 on
  uint64_t offset = 0, size = 0;  // bytes
  std::string scheme;  // "gpt" or "mbr"
};

// Reads exactly out.size() bytes at offset (short at the end of the disk: zeros).
using DiskReader = std::function<void(uint64_t offset, std::span<std::byte> out)>;

// The partitions of a disk of disk_size bytes, in number order; empty when
// it has no table this understands. Throws only what read throws.
std::vector<Partition> find_partitions(const DiskReader& read, uint64_t disk_size);

}  // namespace cbtfs
