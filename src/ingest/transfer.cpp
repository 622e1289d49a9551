#include "transfer.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

namespace cbtfs::ingest {

TransferStats transfer(const std::vector<nbd::Target>& targets, const nbd::Options& opts, int connections,
                       const std::vector<Extent>& extents, uint64_t virtual_size, PointWriter& writer,
                       const std::function<void(uint64_t)>& progress) {
  TransferStats stats;
  if (extents.empty()) return stats;
  size_t max_extent = 0;
  for (auto& e : extents) max_extent = std::max<size_t>(max_extent, e.count * kBlockSize);
  connections = std::clamp<int>(connections, 1, static_cast<int>(std::min<size_t>(extents.size(), 16)));

  // Connections are opened one after another (XenServer's NBD server plugs
  // a VBD per connection and is known to race when many arrive at once), each
  // by its own worker, which starts reading at once: the first handshake
  // alone delays the transfer, not all of them.
  std::vector<std::unique_ptr<nbd::Connection>> conns(static_cast<size_t>(connections));
  std::mutex open_mu;
  size_t opened = 0;
  std::condition_variable open_cv;

  // Each worker claims a batch of extents (up to 16, up to 4 MiB) and has
  // them all in flight at once; at most 64 MiB is read ahead of the writer.
  constexpr size_t kBatchCount = 16, kBatchBytes = 4 << 20, kMaxAhead = 64 << 20;
  auto bytes_of = [&](size_t i) { return static_cast<size_t>(extents[i].count * kBlockSize); };
  std::mutex mu;
  std::condition_variable cv;
  // Extent buffers are not zero-filled (refilled at once by the read); only
  // the padding past the disk's end is cleared.
  struct Buffer {
    std::unique_ptr<std::byte[]> data;
    size_t size = 0;
  };
  std::map<size_t, Buffer> ready;
  std::vector<std::unique_ptr<std::byte[]>> spare;  // buffers to reuse: no fresh pages per extent
  size_t next = 0, ahead = 0;
  std::exception_ptr failure;
  bool stop = false;

  // The first failure stops every worker and is what transfer() throws.
  auto fail_with = [&](std::exception_ptr e) {
    std::lock_guard g(mu);
    if (!failure) failure = e;
    stop = true;
    cv.notify_all();
  };
  // Opens worker id's connection once the one before it has had its turn;
  // nullptr if it failed or the transfer already stopped.
  auto open_in_turn = [&](size_t id) -> nbd::Connection* {
    std::unique_lock lk(open_mu);
    open_cv.wait(lk, [&] { return opened == id; });
    bool stopped;
    {
      std::lock_guard g(mu);
      stopped = stop;
    }
    try {
      if (!stopped) {
        auto conn = std::make_unique<nbd::Connection>(targets, opts);
        if (conn->size() < virtual_size)
          throw nbd::NbdError("the NBD export has " + std::to_string(conn->size()) + " bytes, the VDI " +
                              std::to_string(virtual_size));
        conns[id] = std::move(conn);
      }
    } catch (...) {
      fail_with(std::current_exception());
    }
    ++opened;
    open_cv.notify_all();
    return conns[id].get();
  };

  auto worker = [&](size_t id) {
    nbd::Connection* opened_conn = open_in_turn(id);
    if (!opened_conn) return;
    nbd::Connection& conn = *opened_conn;
    std::vector<size_t> batch;
    std::vector<Buffer> bufs;
    std::vector<nbd::Connection::Request> reqs;
    for (;;) {
      batch.clear();
      bufs.clear();
      reqs.clear();
      {
        std::unique_lock lk(mu);
        // ahead == 0 means every claimed extent was written: the next one
        // is always allowed, so the writer never waits on the cap.
        cv.wait(lk, [&] {
          return stop || next >= extents.size() || ahead == 0 || ahead + bytes_of(next) <= kMaxAhead;
        });
        if (stop || next >= extents.size()) return;
        size_t bytes = 0;
        while (next < extents.size() && batch.size() < kBatchCount &&
               (batch.empty() || (bytes + bytes_of(next) <= kBatchBytes && ahead + bytes_of(next) <= kMaxAhead))) {
          bytes += bytes_of(next);
          ahead += bytes_of(next);
          batch.push_back(next++);
        }
        for (size_t k = 0; k < batch.size(); ++k) {
          Buffer b;
          if (!spare.empty()) {
            b.data = std::move(spare.back());
            spare.pop_back();
          }
          bufs.push_back(std::move(b));
        }
      }
      for (size_t k = 0; k < batch.size(); ++k) {
        const Extent& e = extents[batch[k]];
        Buffer& buf = bufs[k];
        if (!buf.data) buf.data.reset(new std::byte[max_extent]);
        buf.size = e.count * kBlockSize;
        uint64_t off = e.first * kBlockSize;
        uint64_t len = std::min<uint64_t>(buf.size, virtual_size - off);
        std::memset(buf.data.get() + len, 0, buf.size - len);
        reqs.push_back({off, {buf.data.get(), static_cast<size_t>(len)}});
      }
      try {
        conn.pread_batch(reqs);
      } catch (...) {
        fail_with(std::current_exception());
        return;
      }
      std::lock_guard g(mu);
      for (size_t k = 0; k < batch.size(); ++k) ready.emplace(batch[k], std::move(bufs[k]));
      cv.notify_all();
    }
  };

  std::vector<std::thread> threads;
  for (size_t i = 0; i < conns.size(); ++i) threads.emplace_back(worker, i);
  auto join = [&] {
    {
      std::lock_guard g(mu);
      stop = true;
    }
    cv.notify_all();
    for (auto& t : threads) t.join();
  };

  uint64_t done = 0;
  try {
    for (size_t idx = 0; idx < extents.size(); ++idx) {
      Buffer buf;
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return failure || ready.count(idx); });
        if (failure) std::rethrow_exception(failure);
        buf = std::move(ready[idx]);
        ready.erase(idx);
      }
      cv.notify_all();
      const Extent& e = extents[idx];
      for (uint64_t i = 0; i < e.count; ++i)
        writer.put_block(e.first + i, {buf.data.get() + i * kBlockSize, kBlockSize});
      stats.blocks += e.count;
      {
        std::lock_guard g(mu);
        spare.push_back(std::move(buf.data));
        ahead -= bytes_of(idx);
      }
      cv.notify_all();
      done += std::min<uint64_t>(e.count * kBlockSize, virtual_size - e.first * kBlockSize);
      if (progress) progress(done);
    }
  } catch (...) {
    join();
    throw;
  }
  join();
  for (auto& c : conns)
    if (c) stats.bytes_read += c->bytes_read();
  return stats;
}

}  // namespace cbtfs::ingest
