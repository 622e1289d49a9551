// Which blocks two points of one VDI may hold differently, from their index
// trees alone: no data block is read. Equal refs mean equal blocks, and equal
// node refs equal subtrees, so the walk skips what the points share and
// costs the index nodes of the difference, not the disk's size.
#pragma once

#include <cstdint>
#include <vector>

#include "cbtfs/repository.hpp"

namespace cbtfs {

// Blocks [first, first + count).
struct BlockRun {
  uint64_t first = 0, count = 0;
  bool operator==(const BlockRun&) const = default;
};

// The blocks of [0, max of both block counts) whose contents may differ
// between a and b, ascending, adjacent ones merged. Never misses a
// difference; may report a block whose bytes happen to be equal (two
// chains that stored the same data twice in format 1). Points of another
// size, or of another tree depth, differ everywhere past the shorter one's
// end; a depth that differs makes every block count as changed.
std::vector<BlockRun> changed_blocks_between(Repository& repo, const Manifest& a, const Manifest& b);

uint64_t block_total(const std::vector<BlockRun>& runs);

}  // namespace cbtfs
