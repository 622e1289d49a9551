// A throw-away writable layer over points, for `cbtfs -o overlay`: writes
// land in a scratch file (in RAM, or in a directory), reads see them over
// the point, and all of it is gone when the mount goes. The repository is
// never written.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cbtfs/repository.hpp"

namespace cbtfs {

// The writes to one point, at 4 KiB granularity.
class PointOverlay {
 public:
  PointOverlay(int scratch_fd, uint64_t size);
  ~PointOverlay();
  PointOverlay(const PointOverlay&) = delete;
  PointOverlay& operator=(const PointOverlay&) = delete;

  // Like PointReader::read, with the writes laid over base.
  size_t read(PointReader& base, uint64_t offset, std::span<std::byte> out);
  // Writes within the point's size; throws UsageError past its end.
  void write(PointReader& base, uint64_t offset, std::span<const std::byte> data);
  bool written() const;

 private:
  static constexpr uint64_t kPage = 4096;
  bool has(uint64_t page) const { return bits_[page / 64] >> (page % 64) & 1; }
  void pread_all(std::byte* p, size_t n, uint64_t off) const;
  void pwrite_all(const std::byte* p, size_t n, uint64_t off);

  int fd_;
  uint64_t size_;
  std::vector<uint64_t> bits_;
  mutable std::shared_mutex mu_;
  bool any_ = false;
};

class OverlayStore {
 public:
  // dir empty: scratch in RAM (memfd); else unlinked files in dir.
  explicit OverlayStore(std::string dir) : dir_(std::move(dir)) {}
  // The overlay of a point, made on first use and kept until the mount goes.
  std::shared_ptr<PointOverlay> of(const Manifest& point);

 private:
  std::string dir_;
  std::mutex mu_;
  std::map<std::pair<std::string, uint32_t>, std::shared_ptr<PointOverlay>> overlays_;
};

}  // namespace cbtfs
