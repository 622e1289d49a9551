#include "transfer.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <future>
#include <mutex>
#include <stdexcept>
#include <stop_token>
#include <thread>

#include "reorder_window.hpp"

namespace cbtfs::ingest {

namespace {

// Each worker claims a batch of extents (up to 16, up to 4 MiB) and has
// them all in flight at once; at most source.read_ahead bytes are read
// ahead of the writer.
constexpr size_t kBatchCount = 16, kBatchBytes = 4 << 20;
// A busy NBD server is asked again after 1 s, then 2, 4, ... at most 30 s apart.
constexpr std::chrono::seconds kFirstBusyWait{1}, kMaxBusyWait{30};

nbd::Options without_busy_retries(nbd::Options o) {
  o.retry_busy = false;  // the transfer waits a busy server out itself, holding its slot
  return o;
}

// One transfer: a worker thread per connection reads extents into the
// reorder window; the calling thread hands them to the writer in order.
class Transfer {
 public:
  Transfer(const Source& source, size_t connections, const std::vector<Extent>& extents, uint64_t virtual_size,
           PointWriter& writer, const std::function<void(uint64_t)>& progress)
      : source_(source),
        opts_(without_busy_retries(source.opts)),
        extents_(extents),
        virtual_size_(virtual_size),
        writer_(writer),
        progress_(progress),
        max_extent_(max_extent_bytes(extents)),
        share_(*source.budget, source.host),
        slots_(connections),
        conns_(connections),
        window_(extents.size(), [this](size_t i) { return bytes_of(i); }, source.read_ahead) {}

  // Throws the first failure of any worker, or the writer's; the workers
  // are joined either way.
  TransferStats run() {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < conns_.size(); ++i) threads.emplace_back(&Transfer::worker, this, i);
    auto join = [&] {
      stop_.request_stop();  // workers still waiting for a slot give up
      window_.stop();
      {
        std::lock_guard g(open_mu_);
        open_cv_.notify_all();
      }
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
  // a VBD per connection and is known to race when many arrive at once),
  // each by its own worker once the host's budget gives it a slot; it
  // starts reading at once. The first connection is waited for while the
  // server is busy; a later one is not worth it: its worker gives its slot
  // back and the transfer goes on with the connections it has.
  // nullptr when this worker has no connection to read with.
  nbd::Connection* open(size_t id) {
    HostBudget::Slot slot = share_.acquire(stop_.get_token());
    if (!slot) return nullptr;
    std::unique_lock lk(open_mu_);
    auto deadline = std::chrono::steady_clock::now() + source_.busy_timeout;
    auto wait = kFirstBusyWait;
    bool waiting = false;  // this worker is the one waiting the server out
    for (;;) {
      if (window_.stopped()) break;
      bool first = opened_ == 0 && (!busy_waiter_ || waiting);
      try {
        auto conn = std::make_unique<nbd::Connection>(source_.targets, opts_);
        if (conn->size() < virtual_size_)
          throw nbd::NbdError("the NBD export has " + std::to_string(conn->size()) + " bytes, the VDI " +
                              std::to_string(virtual_size_));
        slots_[id] = std::move(slot);
        conns_[id] = std::move(conn);
        ++opened_;
        break;
      } catch (const nbd::ServerBusy& e) {
        if (!first) break;
        if (std::chrono::steady_clock::now() + wait > deadline) {
          window_.fail(std::make_exception_ptr(nbd::NbdError(
              "host " + source_.host + " refused every NBD connection for " +
              std::to_string(source_.busy_timeout.count()) + " s: " + e.what() +
              ". Other backup tools may be using the host's NBD connections: lower --host-connections, or "
              "run when they are done")));
          break;
        }
        if (!waiting && source_.log)
          source_.log("the NBD server of host " + source_.host + " is busy (at its connection limit); waiting up to " +
                      std::to_string(source_.busy_timeout.count()) + " s for it");
        waiting = busy_waiter_ = true;
        open_cv_.wait_for(lk, wait, [&] { return window_.stopped(); });
        wait = std::min(wait * 2, kMaxBusyWait);
      } catch (...) {
        window_.fail(std::current_exception());
        break;
      }
    }
    if (waiting) busy_waiter_ = false;
    return conns_[id].get();
  }

  // Reads batches of extents into the window until all are claimed or the
  // transfer stops.
  void worker(size_t id) {
    nbd::Connection* conn = open(id);
    if (!conn) {
      std::lock_guard g(open_mu_);
      // Should no worker have opened a connection, nothing would ever
      // fill the window: the last one to leave says so.
      if (++left_ == conns_.size() && opened_ == 0)
        window_.fail(std::make_exception_ptr(nbd::NbdError("no NBD connection could be opened")));
      return;
    }
    ReorderWindow::Batch batch;
    std::vector<nbd::Connection::Request> reqs;
    // The batch read last is checksummed (XXH3, and in format 2 the
    // HMAC-SHA-256 id: milliseconds per 4 MiB) on a thread of its own while
    // this one reads the next, so the connection has requests in flight
    // through the link's round trip instead of waiting for the hashing.
    std::future<void> hashing;
    auto finish_hashing = [&] {
      if (hashing.valid()) hashing.get();
    };
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
        finish_hashing();
        hashing = std::async(std::launch::async, [this, read = std::move(batch)]() mutable {
          try {
            for (auto& buf : read.buffers) {
              buf.digests.resize(buf.size / kBlockSize);
              for (size_t i = 0; i < buf.digests.size(); ++i)
                buf.digests[i] = writer_.digest({buf.data.get() + i * kBlockSize, kBlockSize});
            }
            window_.put(read);
          } catch (...) {
            window_.fail(std::current_exception());
          }
        });
        batch = {};
      } catch (...) {
        window_.fail(std::current_exception());
        finish_hashing();
        return;
      }
    }
    finish_hashing();
    stop_.request_stop();  // every extent is claimed: no use for more connections
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
        writer_.put_block(e.first + i, {buf->data.get() + i * kBlockSize, kBlockSize}, buf->digests[i]);
      blocks += e.count;
      window_.release(std::move(*buf));
      done += std::min<uint64_t>(e.count * kBlockSize, virtual_size_ - e.first * kBlockSize);
      if (progress_) progress_(done);
    }
    return blocks;
  }

  const Source& source_;
  const nbd::Options opts_;
  const std::vector<Extent>& extents_;
  const uint64_t virtual_size_;
  PointWriter& writer_;
  const std::function<void(uint64_t)>& progress_;
  const size_t max_extent_;

  // Declared in this order so that a connection closes before its slot
  // goes back, and the slots before their share.
  HostBudget::Share share_;
  std::vector<HostBudget::Slot> slots_;                  // one per worker
  std::vector<std::unique_ptr<nbd::Connection>> conns_;  // one per worker
  std::stop_source stop_;  // no more connections wanted
  std::mutex open_mu_;     // one handshake at a time
  std::condition_variable open_cv_;
  size_t opened_ = 0;        // connections opened
  bool busy_waiter_ = false;  // a worker is waiting the busy server out
  size_t left_ = 0;           // workers that ended without a connection

  // Extents read and not yet written. The first failure (window_.fail)
  // stops every worker and is what transfer() throws.
  ReorderWindow window_;
};

// How many connections are worth opening for these extents. Each costs
// the host a TLS handshake and a VBD plugged into its control domain (a
// good part of a second on a real host), and costs us a core while libnbd
// 1.14 busy-waits through the handshake; one connection keeps a batch of
// up to 4 MiB in flight: a connection per 32 MiB to read, and never more
// than there are batches to claim. A pool's many small deltas then take
// one each, and its parallelism comes from --jobs.
constexpr uint64_t kBytesPerConnection = 32 << 20;

size_t batch_count(const std::vector<Extent>& extents) {
  size_t batches = 0, items = 0, bytes = 0;
  for (auto& e : extents) {
    size_t size = static_cast<size_t>(e.count * kBlockSize);
    if (items == 0 || items == kBatchCount || bytes + size > kBatchBytes) {
      ++batches;
      items = bytes = 0;
    }
    ++items;
    bytes += size;
  }
  return batches;
}

}  // namespace

std::string host_key(const nbd::Target& t) { return t.subject.empty() ? t.address : t.subject; }

TransferStats transfer(const Source& source, int connections, const std::vector<Extent>& extents,
                       uint64_t virtual_size, PointWriter& writer, const std::function<void(uint64_t)>& progress) {
  if (extents.empty()) return {};
  uint64_t bytes = 0;
  for (auto& e : extents) bytes += e.count * kBlockSize;
  size_t worth = std::min<size_t>(batch_count(extents), (bytes + kBytesPerConnection - 1) / kBytesPerConnection);
  connections = std::clamp<int>(connections, 1, static_cast<int>(std::min<size_t>(worth, source.budget->per_host())));
  return Transfer(source, static_cast<size_t>(connections), extents, virtual_size, writer, progress).run();
}

}  // namespace cbtfs::ingest
