// The changed-block bitmap of VDI.list_changed_blocks: base64 text, one bit
// per 64 KiB block, most significant bit first. Pure functions, so the
// parser can be tested and fuzzed on its own.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace cbtfs::ingest {

class BitmapError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Extent {
  uint64_t first;  // block index
  uint64_t count;  // blocks
};

// Throws BitmapError on bad base64 or a bitmap too short for nblocks.
std::vector<bool> decode_changed_blocks(std::string_view base64, uint64_t nblocks);
// Runs of set bits, each split to at most max_blocks.
std::vector<Extent> changed_extents(const std::vector<bool>& bits, uint64_t max_blocks);
std::vector<Extent> all_extents(uint64_t nblocks, uint64_t max_blocks);

}  // namespace cbtfs::ingest
