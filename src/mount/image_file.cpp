#include "image_file.hpp"

#include <algorithm>

namespace cbtfs {

std::vector<LvImage::Range> ImageFile::ranges(uint64_t pos, uint64_t length, size_t max_ranges) const {
  if (entry_.lv) return entry_.lv->map(pos, length, max_ranges);
  return {{pos, length, entry_.offset + pos}};
}

size_t ImageFile::read(uint64_t pos, std::span<std::byte> out) {
  if (pos >= size()) return 0;
  out = out.first(static_cast<size_t>(std::min<uint64_t>(out.size(), size() - pos)));
  for (auto& r : ranges(pos, out.size())) {
    auto part = out.subspan(static_cast<size_t>(r.lv_offset - pos), static_cast<size_t>(r.length));
    size_t n = overlay_ ? overlay_->read(reader_, r.disk_offset, part) : reader_.read(r.disk_offset, part);
    std::fill(part.begin() + static_cast<std::ptrdiff_t>(n), part.end(), std::byte{0});  // within the point: never short
  }
  return out.size();
}

void ImageFile::write(uint64_t pos, std::span<const std::byte> data) {
  for (auto& r : ranges(pos, data.size()))
    overlay_->write(reader_, r.disk_offset,
                    data.subspan(static_cast<size_t>(r.lv_offset - pos), static_cast<size_t>(r.length)));
}

std::optional<uint64_t> ImageFile::seek(uint64_t pos, bool data) {
  // Written pages are data wherever they are: no holes are claimed.
  if (overlay_ && overlay_->written()) return data ? pos : size();
  // Range by range, up to a budget (a striped LV has one per chunk); past
  // it, everything counts as data, which is never wrong to claim.
  constexpr size_t kBudget = 4096;
  auto rs = ranges(pos, size() - pos, kBudget);
  for (auto& r : rs) {
    uint64_t end = r.disk_offset + r.length;
    uint64_t f = std::min(data ? reader_.next_data(r.disk_offset) : reader_.next_hole(r.disk_offset), end);
    if (f < end) return r.lv_offset + (f - r.disk_offset);
  }
  if (!data) return size();
  uint64_t seen = rs.empty() ? pos : rs.back().lv_offset + rs.back().length;
  if (seen >= size()) return std::nullopt;
  return seen;
}

}  // namespace cbtfs
