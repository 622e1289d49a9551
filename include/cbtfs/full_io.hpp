// Whole reads and writes on a file descriptor: a signal (EINTR) or a short
// transfer is not the end, so every caller would otherwise loop. Callers
// turn a failure into their own error, naming what they were doing.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cbtfs::io {

struct Result {
  size_t bytes = 0;  // transferred
  int error = 0;     // 0: all of it, or (a read) all there was before end of file
};

// offset < 0: at the descriptor's position (pipes, sockets); else pread/pwrite.
Result read_all(int fd, void* buf, size_t n, int64_t offset = -1);
// A write that moves nothing fails with EIO rather than spinning.
Result write_all(int fd, const void* buf, size_t n, int64_t offset = -1);

}  // namespace cbtfs::io
