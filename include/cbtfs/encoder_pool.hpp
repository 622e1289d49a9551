// Compresses records on worker threads while the writer's thread reads and
// hashes the next blocks. Results come back in submission order, so a pack
// still holds its blocks in disk order.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/seal.hpp"

namespace cbtfs {

class EncoderPool {
 public:
  struct Encoded {
    Bytes stored;
    BlockRef ref;  // stored_len and hash filled in
  };

  explicit EncoderPool(unsigned threads);
  ~EncoderPool();
  EncoderPool(const EncoderPool&) = delete;
  EncoderPool& operator=(const EncoderPool&) = delete;

  // sealer: an encrypted repository's (the record is bound to id).
  // compress=false: stored raw, LZ4 not tried.
  std::future<Encoded> submit(Bytes plain, uint64_t hash, const BlockId& id = {}, const Sealer* sealer = nullptr,
                              bool compress = true);

 private:
  void work();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<Encoded()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace cbtfs
