#include "cbtfs/full_io.hpp"

#include <unistd.h>

#include <cerrno>

namespace cbtfs::io {

Result read_all(int fd, void* buf, size_t n, int64_t offset) {
  auto* p = static_cast<char*>(buf);
  Result r;
  while (r.bytes < n) {
    ssize_t k = offset < 0 ? ::read(fd, p + r.bytes, n - r.bytes)
                           : ::pread(fd, p + r.bytes, n - r.bytes, static_cast<off_t>(offset + static_cast<int64_t>(r.bytes)));
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) {
      r.error = errno;
      break;
    }
    if (k == 0) break;
    r.bytes += static_cast<size_t>(k);
  }
  return r;
}

Result write_all(int fd, const void* buf, size_t n, int64_t offset) {
  auto* p = static_cast<const char*>(buf);
  Result r;
  while (r.bytes < n) {
    ssize_t k = offset < 0 ? ::write(fd, p + r.bytes, n - r.bytes)
                           : ::pwrite(fd, p + r.bytes, n - r.bytes, static_cast<off_t>(offset + static_cast<int64_t>(r.bytes)));
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      r.error = k < 0 ? errno : EIO;
      break;
    }
    r.bytes += static_cast<size_t>(k);
  }
  return r;
}

}  // namespace cbtfs::io
