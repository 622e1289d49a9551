// The mount's read cache: fixed-size chunks of objects in one unlinked file
// (so it vanishes with the process), least recently used evicted first.
// A chunk is fetched once however many readers want it; a reader moving
// forward through an object has the next chunks fetched in parallel.
#include "cbtfs/cached_storage.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"

namespace cbtfs {
namespace {

class CachedStorage final : public Storage {
 public:
  CachedStorage(std::unique_ptr<Storage> inner, const CacheOptions& o) : inner_(std::move(inner)), o_(o) {
    fd_ = ::open(o_.dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ < 0)
      throw StorageError("cannot create a cache file in " + o_.dir + ": " + std::strerror(errno), errno);
    uint64_t slots = std::max<uint64_t>(2 * o_.threads, o_.size / o_.chunk);
    for (uint64_t i = slots; i-- > 0;) free_.push_back(static_cast<uint32_t>(i));
    // No threads yet: see start_workers().
  }
  ~CachedStorage() override {
    {
      std::lock_guard g(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : workers_) t.join();
    ::close(fd_);
  }

  void read(const std::string& key, uint64_t offset, std::span<std::byte> out) override {
    if (out.empty()) return;
    uint64_t size = object_size(key);
    if (offset + out.size() > size)
      throw FormatError("short read from " + inner_->describe() + "/" + key + " at offset " + std::to_string(offset) +
                        ": the object is truncated");
    uint64_t first = offset / o_.chunk, last = (offset + out.size() - 1) / o_.chunk;
    for (uint64_t c = first; c <= last; ++c) {
      uint64_t from = std::max(offset, c * o_.chunk);
      uint64_t to = std::min(offset + out.size(), (c + 1) * o_.chunk);
      auto dst = out.subspan(from - offset, to - from);
      Pin pin = acquire(key, c, size, /*whole_on_first_touch=*/false);
      if (!pin.entry) {  // a first, lone touch, or every slot busy: around the cache
        inner_->read(key, from, dst);
        continue;
      }
      uint64_t at = uint64_t{pin.entry->slot} * o_.chunk + (from - c * o_.chunk);
      auto r = io::read_all(fd_, dst.data(), dst.size(), static_cast<int64_t>(at));
      release(pin);
      if (r.bytes < dst.size()) {
        int err = r.error ? r.error : EIO;
        throw StorageError("cannot read the cache file: " + std::string(std::strerror(err)), err);
      }
    }
    read_ahead(key, last, size);
  }

  std::optional<Bytes> get(const std::string& key) override { return inner_->get(key); }
  std::optional<uint64_t> size(const std::string& key) override { return inner_->size(key); }
  std::vector<std::string> list(const std::string& prefix) override { return inner_->list(prefix); }
  std::unique_ptr<ObjectWriter> create(const std::string& key) override { return inner_->create(key); }
  void remove(const std::string& key) override {
    forget(key);
    inner_->remove(key);
  }
  void remove_temporaries(const std::string& prefix) override { inner_->remove_temporaries(prefix); }
  std::unique_ptr<Claim> claim_shared(const std::string& key) override { return inner_->claim_shared(key); }
  std::unique_ptr<Claim> claim_exclusive(const std::string& key) override { return inner_->claim_exclusive(key); }
  uint64_t discard(const std::string& key, uint64_t offset, uint64_t length) override {
    return inner_->discard(key, offset, length);
  }
  uint64_t discardable(const std::string& key, uint64_t offset, uint64_t length) override {
    return inner_->discardable(key, offset, length);
  }
  std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) override {
    return inner_->try_lock(key, holder);
  }
  std::string describe() const override { return inner_->describe(); }
  std::vector<std::string> unfinished(const std::string& prefix) override { return inner_->unfinished(prefix); }
  void drop_unfinished(const std::string& key) override { inner_->drop_unfinished(key); }
  unsigned parallelism() const override { return inner_->parallelism(); }

 private:
  struct Entry {
    uint32_t slot = 0;
    bool ready = false;
    int users = 0;
    std::list<std::string>::iterator lru;
  };
  struct Pin {
    Entry* entry = nullptr;
  };

  static std::string chunk_id(const std::string& key, uint64_t c) { return key + '#' + std::to_string(c); }

  uint64_t object_size(const std::string& key) {
    {
      std::lock_guard g(mu_);
      if (auto it = sizes_.find(key); it != sizes_.end()) return it->second;
    }
    auto s = inner_->size(key);
    if (!s) throw StorageError(inner_->describe() + "/" + key + " does not exist", ENOENT);
    std::lock_guard g(mu_);
    sizes_[key] = *s;
    return *s;
  }

  // The chunk, fetched if need be and pinned against eviction; an empty
  // Pin when no slot can be had.
  // A chunk not cached is fetched whole for a chunk read before (a hot
  // spot, or a stream that goes on) or when reading ahead; a chunk touched
  // once, like an index node a writer reads from its parent, is not (the
  // empty Pin says: read just the bytes).
  Pin acquire(const std::string& key, uint64_t c, uint64_t size, bool whole_on_first_touch) {
    std::string id = chunk_id(key, c);
    std::unique_lock g(mu_);
    for (;;) {
      auto it = map_.find(id);
      if (it == map_.end()) break;
      Entry& e = it->second;
      if (e.ready) {
        ++e.users;
        lru_.splice(lru_.begin(), lru_, e.lru);
        return {&e};
      }
      ready_cv_.wait(g);
    }
    if (touched_.size() > kMaxTouched) touched_.clear();
    if (touched_.insert(id).second && !whole_on_first_touch) return {};
    auto slot = take_slot();
    if (!slot) return {};
    lru_.push_front(id);
    Entry& e = map_[id];
    e.slot = *slot;
    e.users = 1;
    e.lru = lru_.begin();
    g.unlock();
    try {
      fetch(key, c, size, e.slot);
    } catch (...) {
      // The entry goes: waiters and later readers try the fetch themselves.
      g.lock();
      lru_.erase(e.lru);
      free_.push_back(e.slot);
      map_.erase(id);
      ready_cv_.notify_all();
      throw;
    }
    g.lock();
    e.ready = true;
    ready_cv_.notify_all();
    return {&e};
  }

  void release(Pin& p) {
    std::lock_guard g(mu_);
    --p.entry->users;
  }

  std::optional<uint32_t> take_slot() {
    if (!free_.empty()) {
      uint32_t s = free_.back();
      free_.pop_back();
      return s;
    }
    for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
      auto m = map_.find(*it);
      if (m->second.users == 0 && m->second.ready) {
        uint32_t s = m->second.slot;
        lru_.erase(m->second.lru);
        map_.erase(m);
        return s;
      }
    }
    return std::nullopt;
  }

  void fetch(const std::string& key, uint64_t c, uint64_t size, uint32_t slot) {
    uint64_t from = c * o_.chunk;
    Bytes buf(std::min<uint64_t>(o_.chunk, size - from));
    inner_->read(key, from, buf);
    uint64_t at = uint64_t{slot} * o_.chunk;
    if (auto r = io::write_all(fd_, buf.data(), buf.size(), static_cast<int64_t>(at)); r.error)
      throw StorageError("cannot write the cache file in " + o_.dir + ": " + std::strerror(r.error), r.error);
  }

  // A reader that just moved from chunk c-1 of key to chunk c is
  // streaming: the chunks after it are queued for the workers.
  void read_ahead(const std::string& key, uint64_t c, uint64_t size) {
    std::lock_guard g(mu_);
    auto [it, first_read] = last_chunk_.try_emplace(key, c);
    bool sequential = !first_read && c == it->second + 1;
    it->second = c;
    if (!sequential || o_.readahead == 0) return;
    start_workers();
    uint64_t chunks = (size + o_.chunk - 1) / o_.chunk;
    for (uint64_t n = c + 1; n < chunks && n <= c + o_.readahead; ++n) {
      std::string id = chunk_id(key, n);
      if (map_.count(id) || queued_.count(id)) continue;
      queued_[id] = true;
      work_.push_back({key, n, size});
    }
    while (work_.size() > 4 * o_.readahead) {  // a reader that jumped away
      queued_.erase(chunk_id(work_.front().key, work_.front().chunk));
      work_.pop_front();
    }
    work_cv_.notify_all();
  }

  // The workers start with the first reader that streams, not with the
  // cache: the mount opens the repository before fuse_daemonize() forks,
  // and threads do not survive a fork (the daemon would have none, and
  // would abort joining them at unmount). Called under mu_.
  void start_workers() {
    if (!workers_.empty()) return;
    for (unsigned i = 0; i < o_.threads; ++i) workers_.emplace_back([this] { prefetch_loop(); });
  }

  void prefetch_loop() {
    for (;;) {
      Work w;
      {
        std::unique_lock g(mu_);
        work_cv_.wait(g, [this] { return stop_ || !work_.empty(); });
        if (stop_) return;
        w = work_.front();
        work_.pop_front();
        queued_.erase(chunk_id(w.key, w.chunk));
      }
      try {
        Pin p = acquire(w.key, w.chunk, w.size, /*whole_on_first_touch=*/true);
        if (p.entry) release(p);
      } catch (const std::exception&) {
        // The reader will meet the same error itself, and report it.
      }
    }
  }

  void forget(const std::string& key) {
    std::lock_guard g(mu_);
    sizes_.erase(key);
    last_chunk_.erase(key);
  }

  struct Work {
    std::string key;
    uint64_t chunk = 0, size = 0;
  };

  std::unique_ptr<Storage> inner_;
  CacheOptions o_;
  int fd_ = -1;
  std::mutex mu_;
  std::condition_variable ready_cv_, work_cv_;
  std::unordered_map<std::string, Entry> map_;
  std::list<std::string> lru_;
  std::vector<uint32_t> free_;
  std::unordered_map<std::string, uint64_t> sizes_;
  std::unordered_map<std::string, uint64_t> last_chunk_;
  static constexpr size_t kMaxTouched = 1 << 16;
  std::unordered_set<std::string> touched_;
  std::deque<Work> work_;
  std::unordered_map<std::string, bool> queued_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

}  // namespace

std::unique_ptr<Storage> make_cached_storage(std::unique_ptr<Storage> inner, const CacheOptions& options) {
  return std::make_unique<CachedStorage>(std::move(inner), options);
}

}  // namespace cbtfs
