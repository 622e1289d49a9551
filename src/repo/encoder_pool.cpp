#include "cbtfs/encoder_pool.hpp"

namespace cbtfs {

EncoderPool::EncoderPool(unsigned threads) {
  for (unsigned i = 0; i < std::max(1u, threads); ++i) threads_.emplace_back([this] { work(); });
}

EncoderPool::~EncoderPool() {
  {
    std::lock_guard g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

std::future<EncoderPool::Encoded> EncoderPool::submit(Bytes plain, uint64_t hash, const BlockId& id,
                                                     const Sealer* sealer, bool compress) {
  std::packaged_task<Encoded()> task([plain = std::move(plain), hash, id, sealer, compress]() mutable {
    Encoded e;
    e.ref.id = id;
    e.stored = encode_stored_record(std::move(plain), e.ref, hash, sealer, compress);
    return e;
  });
  auto f = task.get_future();
  {
    std::lock_guard g(mu_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
  return f;
}

void EncoderPool::work() {
  for (;;) {
    std::packaged_task<Encoded()> task;
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

}  // namespace cbtfs
