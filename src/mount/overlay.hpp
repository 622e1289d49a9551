// A throw-away writable layer over points, for `cbtfs -o overlay`: writes
// land in a scratch file (in RAM, or in a directory), reads see them over
// the point, and all of it is gone when the mount goes. The repository is
// never written.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cbtfs/point_reader.hpp"

namespace cbtfs {

// What all the overlays of one mount may hold together (-o overlay_max):
// a RAM overlay must not grow until the machine swaps or the OOM killer
// picks a victim.
struct OverlayBudget {
  uint64_t max = UINT64_MAX;  // bytes
  std::atomic<uint64_t> used{0};
};

// The writes to one point, at 4 KiB granularity.
class PointOverlay {
 public:
  // budget nullptr: no limit but the scratch file's own.
  PointOverlay(int scratch_fd, uint64_t size, std::shared_ptr<OverlayBudget> budget = nullptr);
  ~PointOverlay();
  PointOverlay(const PointOverlay&) = delete;
  PointOverlay& operator=(const PointOverlay&) = delete;

  // Like PointReader::read, with the writes laid over base.
  size_t read(PointReader& base, uint64_t offset, std::span<std::byte> out);
  // Writes within the point's size; throws UsageError past its end, and
  // StorageError(ENOSPC) when the budget has no room for the new pages.
  void write(PointReader& base, uint64_t offset, std::span<const std::byte> data);
  bool written() const;

 private:
  static constexpr uint64_t kPage = 4096;
  bool has(uint64_t page) const { return bits_[page / 64] >> (page % 64) & 1; }
  void pread_all(std::byte* p, size_t n, uint64_t off) const;
  void pwrite_all(const std::byte* p, size_t n, uint64_t off);
  void reserve(uint64_t offset, uint64_t end);

  int fd_;
  uint64_t size_;
  std::vector<uint64_t> bits_;
  mutable std::shared_mutex mu_;
  bool any_ = false;
  std::shared_ptr<OverlayBudget> budget_;
};

class OverlayStore {
 public:
  // dir empty: scratch in RAM (memfd); else unlinked files in dir (an
  // absolute path: the daemon runs in "/"). max_bytes: what all the
  // overlays together may hold.
  OverlayStore(std::string dir, uint64_t max_bytes);
  // The default of -o overlay_max for a RAM overlay: a quarter of the RAM.
  static uint64_t default_ram_max();
  // The overlay of a point, made on first use and kept until the mount goes.
  std::shared_ptr<PointOverlay> of(const Manifest& point);

 private:
  std::string dir_;
  std::shared_ptr<OverlayBudget> budget_ = std::make_shared<OverlayBudget>();
  std::mutex mu_;
  std::map<std::pair<std::string, uint32_t>, std::shared_ptr<PointOverlay>> overlays_;
};

}  // namespace cbtfs
