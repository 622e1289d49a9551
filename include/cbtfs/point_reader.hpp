// Random access to one point as a raw disk image.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/repository.hpp"

namespace cbtfs {

// Thread-safe.
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
  // The point's data as byte runs, adjacent blocks together, from the index
  // alone: it skips zero subtrees, so it costs the index nodes of the data
  // that is there, not the disk's size.
  struct Extent {
    uint64_t offset = 0, length = 0;
  };
  std::vector<Extent> data_extents();
  // Blocks holding data among [first, end): skips zero subtrees, so it
  // costs the index nodes of the data that is there, not the disk's size.
  uint64_t allocated_blocks(uint64_t first, uint64_t end);

 private:
  std::shared_ptr<Repository> repo_;
  ManifestPtr point_;
  bool keep_cached_;
};

}  // namespace cbtfs
