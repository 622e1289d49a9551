// Moves blocks from NBD into a PointWriter: several connections read extents
// in parallel, the writer receives blocks in order through a bounded reorder
// window, so memory stays at a few MiB per connection whatever the disk size.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "cbtfs/point_writer.hpp"
#include "changed_blocks.hpp"
#include "nbd/nbd_reader.hpp"

namespace cbtfs::ingest {

struct TransferStats {
  uint64_t bytes_read = 0;  // over NBD
  uint64_t blocks = 0;      // given to the writer
};

// progress gets the bytes of extents written so far.
// Throws nbd::NbdError (or the writer's errors); the writer is then left
// uncommitted, so nothing becomes visible.
TransferStats transfer(const std::vector<nbd::Target>& targets, const nbd::Options& opts, int connections,
                       const std::vector<Extent>& extents, uint64_t virtual_size, PointWriter& writer,
                       const std::function<void(uint64_t)>& progress);

}  // namespace cbtfs::ingest
