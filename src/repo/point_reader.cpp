// PointReader: a point as a raw disk image. A block is found by walking the
// point's own index tree, whose depth depends only on the virtual size, so
// the cost of a read never depends on how long the chain is.
#include <algorithm>
#include <cstring>

#include "cbtfs/point_reader.hpp"

#include "cbtfs/errors.hpp"

namespace cbtfs {

PointReader::PointReader(std::shared_ptr<Repository> repo, ManifestPtr point, bool keep_cached)
    : repo_(std::move(repo)), point_(std::move(point)), keep_cached_(keep_cached) {}

BlockRef PointReader::lookup(uint64_t block) {
  BlockRef ref = point_->root;
  for (uint32_t level = point_->depth; level > 0; --level) {
    if (ref.is_zero()) return ref;
    ref = IndexNode(*repo_->node(point_->vdi, ref, keep_cached_), repo_->format())[entry_of(block, level)];
  }
  return ref;
}

size_t PointReader::read(uint64_t offset, std::span<std::byte> out) {
  const uint64_t size = point_->virtual_size;
  if (offset >= size) return 0;
  size_t len = static_cast<size_t>(std::min<uint64_t>(out.size(), size - offset));
  size_t done = 0;
  while (done < len) {
    uint64_t pos = offset + done;
    uint64_t block = pos / kBlockSize;
    size_t in_block = static_cast<size_t>(pos % kBlockSize);
    size_t n = std::min<size_t>(kBlockSize - in_block, len - done);
    BlockRef ref = lookup(block);
    std::byte* dst = out.data() + done;
    if (ref.is_zero()) {
      std::memset(dst, 0, n);
    } else if (n == kBlockSize) {
      // Whole-block reads are sequential streams: decode straight into the
      // caller's buffer and keep the cache for small random reads.
      try {
        repo_->read_record(point_->vdi, ref, {dst, n});
      } catch (const CorruptError& e) {
        throw CorruptError("block " + std::to_string(block) + ": " + e.what());
      }
    } else {
      try {
        if (keep_cached_) {
          std::memcpy(dst, repo_->cached_block(point_->vdi, ref).get() + in_block, n);
        } else {
          thread_local Bytes scratch(kBlockSize);  // never cleared: decoded over at once
          repo_->read_record(point_->vdi, ref, scratch);
          std::memcpy(dst, scratch.data() + in_block, n);
        }
      } catch (const CorruptError& e) {
        throw CorruptError("block " + std::to_string(block) + ": " + e.what());
      }
    }
    done += n;
  }
  return len;
}

// Both searches skip whole zero subtrees, so seeking across a sparse 1 TiB
// disk touches only the nodes that exist.
uint64_t PointReader::next_data(uint64_t offset) {
  const uint64_t size = point_->virtual_size;
  const uint64_t nblocks = block_count(size);
  uint64_t b = offset / kBlockSize;
  while (b < nblocks) {
    // Find the highest level at which b's subtree is all zero.
    BlockRef ref = point_->root;
    uint64_t skip = 0;
    for (uint32_t level = point_->depth;; --level) {
      if (ref.is_zero()) {
        uint64_t span = blocks_under(level);
        skip = span - (b & (span - 1));
        break;
      }
      if (level == 0) break;
      ref = IndexNode(*repo_->node(point_->vdi, ref, keep_cached_), repo_->format())[entry_of(b, level)];
    }
    if (skip == 0) return std::max(offset, b * kBlockSize);
    b += skip;
  }
  return size;
}

std::vector<PointReader::Extent> PointReader::data_extents() {
  std::vector<Extent> runs;
  const uint64_t size = point_->virtual_size;
  for (uint64_t off = next_data(0); off < size;) {
    uint64_t end = next_hole(off);
    if (end <= off) throw StorageError("the point's index gives no end to the data at byte " + std::to_string(off), EIO);
    runs.push_back({off, end - off});
    off = end < size ? next_data(end) : size;
  }
  return runs;
}

uint64_t PointReader::next_hole(uint64_t offset) {
  const uint64_t size = point_->virtual_size;
  const uint64_t nblocks = block_count(size);
  for (uint64_t b = offset / kBlockSize; b < nblocks; ++b)
    if (lookup(b).is_zero()) return std::max(offset, b * kBlockSize);
  return size;
}

uint64_t PointReader::allocated_blocks(uint64_t first, uint64_t end) {
  end = std::min(end, block_count(point_->virtual_size));
  // The node at `level` covering blocks [base, base + blocks_under(level)).
  auto count = [&](auto& self, const BlockRef& ref, uint32_t level, uint64_t base) -> uint64_t {
    if (ref.is_zero()) return 0;
    uint64_t span = blocks_under(level - 1);
    uint64_t n = 0;
    auto node = repo_->node(point_->vdi, ref, keep_cached_);
    IndexNode entries(*node, repo_->format());
    for (uint64_t i = 0; i < kFanout; ++i) {
      uint64_t lo = base + i * span, hi = lo + span;
      if (hi <= first || lo >= end) continue;
      if (level == 1) n += !entries[i].is_zero();
      else n += self(self, entries[i], level - 1, lo);
    }
    return n;
  };
  if (first >= end) return 0;
  return count(count, point_->root, point_->depth, 0);
}

}  // namespace cbtfs
