#include "file_appender.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"

namespace cbtfs {
namespace {
// Three buffers: one filling, one writing, one spare so that a slow write
// does not stall the filler at once.
constexpr size_t kBuffers = 3;
constexpr size_t kAlign = 4096;  // every logical block size Linux has

[[noreturn]] void fail(const std::string& path, int err) {
  throw StorageError("cannot write " + path + ": " + std::strerror(err), err);
}

bool set_direct(int fd, bool on) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return false;
  flags = on ? (flags | O_DIRECT) : (flags & ~O_DIRECT);
  return ::fcntl(fd, F_SETFL, flags) == 0;
}
}  // namespace

void FileAppender::FreeAligned::operator()(std::byte* p) const { std::free(p); }

FileAppender::FileAppender(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

FileAppender::~FileAppender() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard g(mu_);
    stop_ = true;  // what is still queued is not written: the file is being dropped
  }
  cv_.notify_all();
  thread_.join();
}

void FileAppender::rethrow_failure() {
  if (failure_) std::rethrow_exception(failure_);
}

void FileAppender::append(std::span<const std::byte> data) {
  while (!data.empty()) {
    if (!current_.data) {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return failure_ || !free_.empty() || storage_.size() < kBuffers; });
      rethrow_failure();
      if (free_.empty()) {
        auto* p = static_cast<std::byte*>(std::aligned_alloc(kAlign, kBufferSize));
        if (!p) throw std::bad_alloc();
        storage_.emplace_back(p);
        free_.push_back(p);
      }
      current_ = Buffer{free_.back(), 0, size_};
      free_.pop_back();
    }
    size_t n = std::min(data.size(), kBufferSize - current_.used);
    std::memcpy(current_.data + current_.used, data.data(), n);
    current_.used += n;
    size_ += n;
    data = data.subspan(n);
    if (current_.used == kBufferSize) hand_off();
  }
}

void FileAppender::hand_off() {
  if (!thread_.joinable()) {
    // A file system without O_DIRECT refuses the flag here (EINVAL), or
    // the first write; either way the data goes through the page cache.
    direct_ = set_direct(fd_, true);
    thread_ = std::thread([this] { work(); });
  }
  {
    std::lock_guard g(mu_);
    queue_.push_back(current_);
  }
  cv_.notify_all();
  current_ = Buffer{nullptr};
}

void FileAppender::work() {
  for (;;) {
    Buffer b{nullptr};
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      b = queue_.front();
      queue_.pop_front();
      writing_ = true;
    }
    std::exception_ptr err;
    if (!failure_) {
      try {
        write_out(b);
      } catch (...) {
        err = std::current_exception();
      }
    }
    {
      std::lock_guard g(mu_);
      if (err && !failure_) failure_ = err;
      free_.push_back(b.data);
      writing_ = false;
    }
    cv_.notify_all();
  }
}

void FileAppender::write_out(const Buffer& b) {
  size_t done = 0;
  while (done < b.used) {
    auto r = io::write_all(fd_, b.data + done, b.used - done, static_cast<int64_t>(b.offset + done));
    done += r.bytes;
    if (r.error == EINVAL && direct_) {  // the file system took the flag but not the write
      direct_ = false;
      if (!set_direct(fd_, false)) fail(path_, errno);
      continue;
    }
    if (r.error) fail(path_, r.error);
  }
}

void FileAppender::finish() {
  if (thread_.joinable()) {
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return queue_.empty() && !writing_; });
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    rethrow_failure();
    // The tail is shorter than a buffer, so not aligned for O_DIRECT.
    if (direct_ && !set_direct(fd_, false)) fail(path_, errno);
    direct_ = false;
  }
  if (current_.data && current_.used) write_out(current_);
  if (current_.data) {
    free_.push_back(current_.data);
    current_ = Buffer{nullptr};
  }
}

}  // namespace cbtfs
