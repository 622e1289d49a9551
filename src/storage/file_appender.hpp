// Appends to a new file from a few aligned 4 MiB buffers that a background
// thread writes out with O_DIRECT where the file system allows it.
//
// Why: a pack is gigabytes written once and read later, if ever. Copying it
// into the page cache cost the ingest's critical thread most of its time
// (perf: copy_folio_from_iter_atomic), and the fsync at commit then wrote it
// all out while nothing else ran. Direct writes of whole buffers skip the
// copy, go to the disk while the next buffer fills, and leave the commit's
// fsync only the tail. Small files never fill a buffer: they are written
// with one plain write at finish() and start no thread.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace cbtfs {

class FileAppender {
 public:
  // fd: open for writing at offset 0, owned by the caller, outliving this.
  // path: for error messages.
  FileAppender(int fd, std::string path);
  ~FileAppender();
  FileAppender(const FileAppender&) = delete;
  FileAppender& operator=(const FileAppender&) = delete;

  // Throws StorageError for a write that failed earlier in the background.
  void append(std::span<const std::byte> data);
  // Writes everything still buffered and waits; throws like append. The
  // caller fsyncs.
  void finish();
  uint64_t size() const { return size_; }

  static constexpr size_t kBufferSize = 4 << 20;

 private:
  struct Buffer {
    std::byte* data;
    size_t used = 0;
    uint64_t offset = 0;
  };
  struct FreeAligned {
    void operator()(std::byte* p) const;
  };
  void hand_off();  // the current buffer goes to the writer thread
  void write_out(const Buffer& b);
  void work();
  void rethrow_failure();

  int fd_;
  std::string path_;
  bool direct_ = false;  // O_DIRECT set on fd_ and not yet given up
  uint64_t size_ = 0;
  std::vector<std::unique_ptr<std::byte, FreeAligned>> storage_;
  Buffer current_{nullptr};

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Buffer> queue_;   // full, to write, oldest first
  std::vector<std::byte*> free_;
  bool writing_ = false;       // the thread holds a buffer
  bool stop_ = false;
  std::exception_ptr failure_;
  std::thread thread_;         // started with the first full buffer
};

}  // namespace cbtfs
