// LVM2 labels and metadata: the input is the start of a device (zeros
// beyond it) whose size is chosen by the first byte; the same bytes are also
// offered as a second device, a partition starting 1 MiB in. Every read must
// stay on its device, every LV shown must map inside its devices, piece by
// piece, without gaps.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mount/lvm.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  uint64_t dev_size = (uint64_t{data[0]} << 20) + size;
  const uint8_t* dev = data + 1;
  size_t have = size - 1;
  auto reader = [&](uint64_t base, uint64_t limit) {
    return [=](uint64_t off, std::span<std::byte> out) {
      if (off > limit || out.size() > limit - off) __builtin_trap();  // reads stay on the device
      std::memset(out.data(), 0, out.size());
      uint64_t at = base + off;
      if (at < have) std::memcpy(out.data(), dev + at, std::min<uint64_t>(out.size(), have - at));
    };
  };
  std::vector<cbtfs::lvm::Device> devices{{reader(0, dev_size), dev_size}};
  if (dev_size > (1u << 20)) devices.push_back({reader(1u << 20, dev_size - (1u << 20)), dev_size - (1u << 20)});
  auto scan = cbtfs::lvm::find_volume_groups(devices);
  for (auto& vg : scan.groups) {
    for (auto& lv : vg.lvs) {
      if (lv.size == 0 || lv.size % vg.extent_size) __builtin_trap();
      cbtfs::lvm::describe_segments(vg, lv);
      for (auto& a : cbtfs::lvm::lv_areas(vg, lv))
        if (a.device >= devices.size() || a.device_offset + a.length > devices[a.device].size) __builtin_trap();
      // A few windows: the start, around each segment boundary, the end.
      std::vector<uint64_t> at{0, lv.size - 1, lv.size / 2};
      for (auto& s : lv.segments)
        if (s.start_extent) at.push_back(s.start_extent * vg.extent_size - 1);
      for (uint64_t off : at) {
        uint64_t len = 300000, pos = off;
        auto pieces = cbtfs::lvm::map_lv(vg, lv, off, len);
        for (auto& p : pieces) {
          if (p.lv_offset != pos || p.length == 0) __builtin_trap();  // in order, no gaps
          if (p.device >= devices.size() || p.device_offset + p.length > devices[p.device].size) __builtin_trap();
          pos += p.length;
        }
        if (pos != std::min(lv.size, off + len)) __builtin_trap();
      }
    }
  }
  return 0;
}
