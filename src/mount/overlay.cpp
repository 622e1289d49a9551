#include "overlay.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"

namespace cbtfs {

PointOverlay::PointOverlay(int scratch_fd, uint64_t size, std::shared_ptr<OverlayBudget> budget)
    : fd_(scratch_fd), size_(size), bits_((size + kPage * 64 - 1) / (kPage * 64)), budget_(std::move(budget)) {}

PointOverlay::~PointOverlay() {
  ::close(fd_);
  if (!budget_) return;
  uint64_t pages = 0;
  for (auto w : bits_) pages += static_cast<uint64_t>(__builtin_popcountll(w));
  budget_->used -= pages * kPage;
}

bool PointOverlay::written() const {
  std::shared_lock g(mu_);
  return any_;
}

void PointOverlay::pread_all(std::byte* p, size_t n, uint64_t off) const {
  auto r = io::read_all(fd_, p, n, static_cast<int64_t>(off));
  if (r.bytes < n) throw StorageError(std::string("cannot read the overlay: ") + std::strerror(r.error ? r.error : EIO), EIO);
}

void PointOverlay::pwrite_all(const std::byte* p, size_t n, uint64_t off) {
  auto r = io::write_all(fd_, p, n, static_cast<int64_t>(off));
  if (r.error) throw StorageError(std::string("cannot write the overlay: ") + std::strerror(r.error), r.error);
}

size_t PointOverlay::read(PointReader& base, uint64_t offset, std::span<std::byte> out) {
  if (offset >= size_) return 0;
  size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), size_ - offset));
  std::shared_lock g(mu_);
  // Runs of pages that are all written or all not, each read from its side.
  for (uint64_t pos = offset, end = offset + n; pos < end;) {
    bool over = has(pos / kPage);
    uint64_t run = pos;
    while (run < end && has(run / kPage) == over) run = (run / kPage + 1) * kPage;
    run = std::min(run, end);
    auto dst = out.subspan(pos - offset, run - pos);
    if (over)
      pread_all(dst.data(), dst.size(), pos);
    else
      base.read(pos, dst);
    pos = run;
  }
  return n;
}

namespace {
std::string mib(uint64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }
}  // namespace

// Takes room for the pages of [offset, end) not written before, all or
// nothing, so that a refused write changes nothing. Called under mu_.
void PointOverlay::reserve(uint64_t offset, uint64_t end) {
  if (!budget_) return;
  uint64_t fresh = 0;
  for (uint64_t p = offset / kPage; p * kPage < end; ++p) fresh += !has(p);
  uint64_t want = fresh * kPage;
  if (!want) return;
  uint64_t used = budget_->used.load();
  do {
    if (want > budget_->max || used > budget_->max - want)
      throw StorageError("the overlay is full (" + mib(used) + " written, overlay_max=" + mib(budget_->max) +
                             "): raise -o overlay_max=SIZE, or give -o overlay=DIR to keep the writes on disk",
                         ENOSPC);
  } while (!budget_->used.compare_exchange_weak(used, used + want));
}

void PointOverlay::write(PointReader& base, uint64_t offset, std::span<const std::byte> data) {
  if (offset + data.size() > size_) throw UsageError("write past the end of the image");
  std::unique_lock g(mu_);
  reserve(offset, offset + data.size());
  std::vector<std::byte> page(kPage);
  for (uint64_t pos = offset, end = offset + data.size(); pos < end;) {
    uint64_t p = pos / kPage, page_end = std::min((p + 1) * kPage, size_);
    uint64_t to = std::min(end, page_end);
    if (!has(p) && (pos > p * kPage || to < page_end)) {
      // A partial first write of a page: the rest of it comes from the point.
      size_t len = static_cast<size_t>(page_end - p * kPage);
      base.read(p * kPage, {page.data(), len});
      std::memcpy(page.data() + (pos - p * kPage), data.data() + (pos - offset), to - pos);
      pwrite_all(page.data(), len, p * kPage);
    } else {
      pwrite_all(data.data() + (pos - offset), to - pos, pos);
    }
    bits_[p / 64] |= uint64_t{1} << (p % 64);
    any_ = true;
    pos = to;
  }
}

OverlayStore::OverlayStore(std::string dir, uint64_t max_bytes) : dir_(std::move(dir)) { budget_->max = max_bytes; }

uint64_t OverlayStore::default_ram_max() {
  long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return uint64_t{1} << 30;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) / 4;
}

std::shared_ptr<PointOverlay> OverlayStore::of(const Manifest& point) {
  std::lock_guard g(mu_);
  auto key = std::make_pair(point.vdi, point.seq);
  if (auto it = overlays_.find(key); it != overlays_.end()) return it->second;
  int fd = dir_.empty() ? ::memfd_create("cbtfs-overlay", MFD_CLOEXEC)
                        : ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0)
    throw StorageError("cannot create an overlay file" + (dir_.empty() ? std::string() : " in " + dir_) + ": " +
                           std::strerror(errno),
                       errno);
  if (::ftruncate(fd, static_cast<off_t>(point.virtual_size)) != 0) {
    int err = errno;
    ::close(fd);
    throw StorageError(std::string("cannot size an overlay file: ") + std::strerror(err), err);
  }
  auto o = std::make_shared<PointOverlay>(fd, point.virtual_size, budget_);
  overlays_[key] = o;
  return o;
}

}  // namespace cbtfs
