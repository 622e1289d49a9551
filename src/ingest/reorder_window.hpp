// The bounded reorder window between the readers of a transfer and its
// writer: readers claim items (extents) in order and finish them in any
// order; the writer takes them back in order. The bound is on the bytes
// claimed and not yet released by the writer, reads in flight included, so
// memory stays bounded however far one reader runs ahead of another.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "cbtfs/format.hpp"

namespace cbtfs::ingest {

// What an item's bytes are read into. Buffers go back to the window once
// written and are handed out again: no fresh pages per item. Their bytes are
// not zero-filled.
struct WindowBuffer {
  std::unique_ptr<std::byte[]> data;
  size_t capacity = 0;  // bytes allocated at data
  size_t size = 0;      // bytes of the item it holds
  std::vector<BlockDigest> digests;  // of each of its blocks, computed by the reader
};

class ReorderWindow {
 public:
  // Items [first, first + buffers.size()), claimed together by one reader.
  struct Batch {
    size_t first = 0;
    std::vector<WindowBuffer> buffers;
  };

  // count items, item i being bytes_of(i) bytes; at most max_ahead bytes are
  // claimed and not yet released, except that when nothing is (every claimed
  // item was released) the next item is admitted whatever its size: the
  // writer never waits on the bound.
  ReorderWindow(size_t count, std::function<size_t(size_t)> bytes_of, size_t max_ahead);

  // For a reader: blocks until the bound admits the next item, then claims it
  // and the ones after it, up to max_items and max_bytes together (the first
  // whatever its size) and within the bound. Each comes with a spare buffer
  // if one fits it, else with an empty one (capacity 0), and its size set.
  // false once stopped or every item is claimed.
  bool claim(size_t max_items, size_t max_bytes, Batch& batch);
  // Hands claimed items, read, to the writer; batch.buffers is left empty.
  void put(Batch& batch);
  void put(size_t item, WindowBuffer buffer);

  // For the writer (one thread): blocks until the next item in order is
  // there and returns it. Throws the first failure, even if the item is
  // there; nullopt once stopped without a failure, or after the last item.
  std::optional<WindowBuffer> take();
  // The writer is done with the oldest item taken: its bytes leave the
  // window and its buffer is kept for a later claim.
  void release(WindowBuffer buffer);

  // The first failure stops the window and is what take() throws; later ones
  // are dropped. Both wake every waiting reader and the writer.
  void fail(std::exception_ptr e);
  void stop();
  bool stopped() const;

 private:
  const size_t count_;
  const std::function<size_t(size_t)> bytes_of_;
  const size_t max_ahead_;

  mutable std::mutex mu_;
  std::condition_variable room_cv_;   // readers: the bound moved, or stop
  std::condition_variable ready_cv_;  // the writer: an item arrived, or stop
  std::map<size_t, WindowBuffer> ready_;
  std::vector<WindowBuffer> spare_;
  size_t next_ = 0;      // the next item to claim
  size_t taken_ = 0;     // the next item to take
  size_t released_ = 0;  // the next item to release
  size_t ahead_ = 0;     // bytes of the items claimed and not released
  std::exception_ptr failure_;
  bool stop_ = false;
};

}  // namespace cbtfs::ingest
