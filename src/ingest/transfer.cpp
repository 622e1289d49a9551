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

  // Opened one after another: XenServer's NBD server plugs a VBD per
  // connection and is known to race when many arrive at once.
  std::vector<std::unique_ptr<nbd::Connection>> conns;
  for (int i = 0; i < connections; ++i) {
    conns.push_back(std::make_unique<nbd::Connection>(targets, opts));
    if (conns.back()->size() < virtual_size)
      throw nbd::NbdError("the NBD export has " + std::to_string(conns.back()->size()) + " bytes, the VDI " +
                          std::to_string(virtual_size));
  }

  const size_t window = static_cast<size_t>(connections) * 2;
  std::mutex mu;
  std::condition_variable cv;
  // Extent buffers are not zero-filled (2 MiB each, refilled at once by
  // the read); only the padding past the disk's end is cleared.
  struct Buffer {
    std::unique_ptr<std::byte[]> data;
    size_t size = 0;
  };
  std::map<size_t, Buffer> ready;
  std::vector<std::unique_ptr<std::byte[]>> spare;  // buffers to reuse: no fresh pages per extent
  size_t next = 0, consumed = 0;
  std::exception_ptr failure;
  bool stop = false;

  auto worker = [&](nbd::Connection& conn) {
    for (;;) {
      size_t idx;
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return stop || next >= extents.size() || next < consumed + window; });
        if (stop || next >= extents.size()) return;
        idx = next++;
      }
      const Extent& e = extents[idx];
      uint64_t off = e.first * kBlockSize;
      uint64_t len = std::min<uint64_t>(e.count * kBlockSize, virtual_size - off);
      Buffer buf;
      {
        std::lock_guard g(mu);
        if (!spare.empty()) {
          buf.data = std::move(spare.back());
          spare.pop_back();
        }
      }
      if (!buf.data) buf.data.reset(new std::byte[max_extent]);
      buf.size = e.count * kBlockSize;
      std::memset(buf.data.get() + len, 0, buf.size - len);
      try {
        conn.pread(off, {buf.data.get(), static_cast<size_t>(len)});
      } catch (...) {
        std::lock_guard g(mu);
        if (!failure) failure = std::current_exception();
        stop = true;
        cv.notify_all();
        return;
      }
      std::lock_guard g(mu);
      ready.emplace(idx, std::move(buf));
      cv.notify_all();
    }
  };

  std::vector<std::thread> threads;
  for (auto& c : conns) threads.emplace_back(worker, std::ref(*c));
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
        ++consumed;
      }
      cv.notify_all();
      const Extent& e = extents[idx];
      for (uint64_t i = 0; i < e.count; ++i)
        writer.put_block(e.first + i, {buf.data.get() + i * kBlockSize, kBlockSize});
      stats.blocks += e.count;
      {
        std::lock_guard g(mu);
        spare.push_back(std::move(buf.data));
      }
      done += std::min<uint64_t>(e.count * kBlockSize, virtual_size - e.first * kBlockSize);
      if (progress) progress(done);
    }
  } catch (...) {
    join();
    throw;
  }
  join();
  for (auto& c : conns) stats.bytes_read += c->bytes_read();
  return stats;
}

}  // namespace cbtfs::ingest
