// One image of the mount as a file, without FUSE: a whole point, a
// partition (a window of it) or an LV (pieces of it), read, written through
// the overlay when there is one, and searched for data and holes. Every
// access goes through the image's disk ranges, whatever kind it is.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "cbtfs/point_reader.hpp"
#include "mount_view.hpp"
#include "overlay.hpp"

namespace cbtfs {

class ImageFile {
 public:
  ImageFile(ViewEntry entry, PointReader reader, std::shared_ptr<PointOverlay> overlay)
      : entry_(std::move(entry)), reader_(std::move(reader)), overlay_(std::move(overlay)) {}
  const ViewEntry& entry() const { return entry_; }
  uint64_t size() const { return entry_.size; }
  bool writable() const { return overlay_ != nullptr; }
  // Reads min(out.size(), size() - pos) bytes; returns the count.
  size_t read(uint64_t pos, std::span<std::byte> out);
  // pos + data.size() <= size(); the overlay only (writable()).
  void write(uint64_t pos, std::span<const std::byte> data);
  // The first offset >= pos (< size()) that holds data, or that is a hole;
  // nullopt for data when there is none. Never claims a hole that is not one.
  std::optional<uint64_t> seek(uint64_t pos, bool data);

 private:
  // The disk ranges of [pos, pos + length): one window, or an LV's pieces.
  std::vector<LvImage::Range> ranges(uint64_t pos, uint64_t length, size_t max_ranges = 1u << 16) const;

  ViewEntry entry_;
  PointReader reader_;
  std::shared_ptr<PointOverlay> overlay_;
};

}  // namespace cbtfs
