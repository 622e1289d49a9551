#include "transfer.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "reorder_window.hpp"

namespace cbtfs::ingest {

namespace {

// Each worker claims a batch of extents (up to 16, up to 4 MiB) and has
// them all in flight at once; at most 64 MiB is read ahead of the writer.
constexpr size_t kBatchCount = 16, kBatchBytes = 4 << 20, kMaxAhead = 64 << 20;

// One transfer: a worker thread per connection reads extents into the
// reorder window; the calling thread hands them to the writer in order.
class Transfer {
 public:
  Transfer(const std::vector<nbd::Target>& targets, const nbd::Options& opts, size_t connections,
           const std::vector<Extent>& extents, uint64_t virtual_size, PointWriter& writer,
           const std::function<void(uint64_t)>& progress)
      : targets_(targets),
        opts_(opts),
        extents_(extents),
        virtual_size_(virtual_size),
        writer_(writer),
        progress_(progress),
        max_extent_(max_extent_bytes(extents)),
        conns_(connections),
        window_(extents.size(), [this](size_t i) { return bytes_of(i); }, kMaxAhead) {}

  // Throws the first failure of any worker, or the writer's; the workers
  // are joined either way.
  TransferStats run() {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < conns_.size(); ++i) threads.emplace_back(&Transfer::worker, this, i);
    auto join = [&] {
      window_.stop();
      for (auto& t : threads) t.join();
    };
    TransferStats stats;
    try {
      stats.blocks = deliver();
    } catch (...) {
      join();
      throw;
    }
    join();
    for (auto& c : conns_)
      if (c) stats.bytes_read += c->bytes_read();
    return stats;
  }

 private:
  size_t bytes_of(size_t i) const { return static_cast<size_t>(extents_[i].count * kBlockSize); }

  static size_t max_extent_bytes(const std::vector<Extent>& extents) {
    size_t max_extent = 0;
    for (auto& e : extents) max_extent = std::max<size_t>(max_extent, e.count * kBlockSize);
    return max_extent;
  }

  // Connections are opened one after another (XenServer's NBD server plugs
  // a VBD per connection and is known to race when many arrive at once), each
  // by its own worker, which starts reading at once: the first handshake
  // alone delays the transfer, not all of them.
  // Opens worker id's connection once the one before it has had its turn;
  // nullptr if it failed or the transfer already stopped.
  nbd::Connection* open_in_turn(size_t id) {
    std::unique_lock lk(open_mu_);
    open_cv_.wait(lk, [&] { return opened_ == id; });
    try {
      if (!window_.stopped()) {
        auto conn = std::make_unique<nbd::Connection>(targets_, opts_);
        if (conn->size() < virtual_size_)
          throw nbd::NbdError("the NBD export has " + std::to_string(conn->size()) + " bytes, the VDI " +
                              std::to_string(virtual_size_));
        conns_[id] = std::move(conn);
      }
    } catch (...) {
      window_.fail(std::current_exception());
    }
    ++opened_;
    open_cv_.notify_all();
    return conns_[id].get();
  }

  // Reads batches of extents into the window until all are claimed or the
  // transfer stops.
  void worker(size_t id) {
    nbd::Connection* conn = open_in_turn(id);
    if (!conn) return;
    ReorderWindow::Batch batch;
    std::vector<nbd::Connection::Request> reqs;
    while (window_.claim(kBatchCount, kBatchBytes, batch)) {
      reqs.clear();
      for (size_t k = 0; k < batch.buffers.size(); ++k) {
        const Extent& e = extents_[batch.first + k];
        WindowBuffer& buf = batch.buffers[k];
        // Every buffer is max_extent_ bytes, so any spare fits any extent.
        if (!buf.data || buf.capacity < buf.size) {
          buf.data.reset(new std::byte[max_extent_]);
          buf.capacity = max_extent_;
        }
        // Extent buffers are not zero-filled (refilled at once by the read);
        // only the padding past the disk's end is cleared.
        uint64_t off = e.first * kBlockSize;
        uint64_t len = std::min<uint64_t>(buf.size, virtual_size_ - off);
        std::memset(buf.data.get() + len, 0, buf.size - len);
        reqs.push_back({off, {buf.data.get(), static_cast<size_t>(len)}});
      }
      try {
        conn->pread_batch(reqs);
      } catch (...) {
        window_.fail(std::current_exception());
        return;
      }
      window_.put(batch);
    }
  }

  // Gives the extents' blocks to the writer in order, on the calling
  // thread; returns the number of blocks.
  uint64_t deliver() {
    uint64_t blocks = 0, done = 0;
    for (size_t idx = 0; idx < extents_.size(); ++idx) {
      std::optional<WindowBuffer> buf = window_.take();
      if (!buf) throw std::logic_error("the transfer stopped before its last extent");
      const Extent& e = extents_[idx];
      for (uint64_t i = 0; i < e.count; ++i)
        writer_.put_block(e.first + i, {buf->data.get() + i * kBlockSize, kBlockSize});
      blocks += e.count;
      window_.release(std::move(*buf));
      done += std::min<uint64_t>(e.count * kBlockSize, virtual_size_ - e.first * kBlockSize);
      if (progress_) progress_(done);
    }
    return blocks;
  }

  const std::vector<nbd::Target>& targets_;
  const nbd::Options& opts_;
  const std::vector<Extent>& extents_;
  const uint64_t virtual_size_;
  PointWriter& writer_;
  const std::function<void(uint64_t)>& progress_;
  const size_t max_extent_;

  std::vector<std::unique_ptr<nbd::Connection>> conns_;  // one per worker
  std::mutex open_mu_;
  std::condition_variable open_cv_;
  size_t opened_ = 0;  // workers that had their turn to open a connection

  // Extents read and not yet written. The first failure (window_.fail)
  // stops every worker and is what transfer() throws.
  ReorderWindow window_;
};

}  // namespace

TransferStats transfer(const std::vector<nbd::Target>& targets, const nbd::Options& opts, int connections,
                       const std::vector<Extent>& extents, uint64_t virtual_size, PointWriter& writer,
                       const std::function<void(uint64_t)>& progress) {
  if (extents.empty()) return {};
  connections = std::clamp<int>(connections, 1, static_cast<int>(std::min<size_t>(extents.size(), 16)));
  return Transfer(targets, opts, static_cast<size_t>(connections), extents, virtual_size, writer, progress).run();
}

}  // namespace cbtfs::ingest
