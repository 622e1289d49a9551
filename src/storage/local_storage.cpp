// Local-directory implementation of the Storage interface.
// Invariant: a key's file appears only through renameat2(RENAME_NOREPLACE) of
// a fully written and fsync'ed temporary in the same directory, followed by an
// fsync of that directory; temporaries start with ".tmp." and are never listed.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <list>
#include <mutex>
#include <random>
#include <unordered_map>
#include <utility>

#include "cbtfs/errors.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs {
namespace {

constexpr const char* kTmpPrefix = ".tmp.";

[[noreturn]] void fail(const std::string& what, const std::string& path, int err = errno) {
  throw StorageError(what + " " + path + ": " + std::strerror(err), err);
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

void fsync_dir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) fail("cannot open directory", dir);
  if (::fsync(fd.get()) != 0) fail("cannot fsync directory", dir);
}

std::string parent_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// mkdir -p, fsync'ing each parent that got a new entry so the new
// directories survive a power loss together with what goes into them.
void make_dirs(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) fail("not a directory:", dir, ENOTDIR);
    return;
  }
  make_dirs(parent_of(dir));
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) fail("cannot create directory", dir);
  fsync_dir(parent_of(dir));
}

class LocalWriter final : public ObjectWriter {
 public:
  LocalWriter(std::string final_path) : final_(std::move(final_path)) {
    make_dirs(parent_of(final_));
    std::random_device rd;
    auto slash = final_.rfind('/');
    tmp_ = final_.substr(0, slash + 1) + kTmpPrefix + final_.substr(slash + 1) + "." +
           std::to_string(::getpid()) + "." + std::to_string(rd());
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd_ < 0) fail("cannot create", tmp_);
  }
  ~LocalWriter() override {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  // Records are small (a 64 KiB block compresses to less): they are kept
  // as given and written with one writev(2) per MiB, without a copy.
  void append(std::span<const std::byte> data) override { append(Bytes(data.begin(), data.end())); }
  void append(Bytes&& data) override {
    size_ += data.size();
    queued_ += data.size();
    queue_.push_back(std::move(data));
    if (queued_ >= kBufferSize || queue_.size() >= kMaxIov) flush();
  }
  void flush() {
    std::vector<iovec> iov;
    for (auto& b : queue_) iov.push_back({b.data(), b.size()});
    size_t first = 0;
    while (first < iov.size()) {
      ssize_t n = ::writev(fd_, iov.data() + first, static_cast<int>(std::min<size_t>(iov.size() - first, kMaxIov)));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("cannot write", tmp_);
      }
      auto left = static_cast<size_t>(n);
      while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
      if (left) {  // a short write: the rest of this buffer goes next
        iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + left;
        iov[first].iov_len -= left;
      }
    }
    queue_.clear();
    queued_ = 0;
  }
  uint64_t size() const override { return size_; }
  void commit() override {
    flush();
    if (::fsync(fd_) != 0) fail("cannot fsync", tmp_);
    ::close(std::exchange(fd_, -1));
    if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, final_.c_str(), RENAME_NOREPLACE) != 0) {
      int err = errno;
      if (err == EEXIST) fail("refusing to overwrite", final_, err);
      fail("cannot rename into place", final_, err);
    }
    committed_ = true;
    fsync_dir(parent_of(final_));
  }

 private:
  static constexpr size_t kBufferSize = 1 << 20;
  static constexpr size_t kMaxIov = 512;
  std::string final_, tmp_;
  std::vector<Bytes> queue_;
  size_t queued_ = 0;
  int fd_ = -1;
  uint64_t size_ = 0;
  bool committed_ = false;
};

class LocalLock final : public StorageLock {
 public:
  explicit LocalLock(Fd fd) : fd_(std::move(fd)) {}

 private:
  Fd fd_;  // flock is released when the descriptor closes or the process dies
};

class LocalStorage final : public Storage {
 public:
  explicit LocalStorage(std::string root) : root_(std::move(root)) {
    while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
    struct stat st;
    if (::stat(root_.c_str(), &st) != 0) fail("cannot access repository", root_);
    if (!S_ISDIR(st.st_mode)) fail("not a directory:", root_, ENOTDIR);
  }
  ~LocalStorage() override {
    for (auto& [k, e] : fds_) ::close(e.fd);
    for (int fd : parked_) ::close(fd);
  }

  void read(const std::string& key, uint64_t offset, std::span<std::byte> out) override {
    int fd = cached_fd(key);
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("cannot read", path(key));
      }
      if (n == 0)
        throw FormatError("short read from " + path(key) + " at offset " + std::to_string(offset + done) +
                          ": the file is truncated");
      done += static_cast<size_t>(n);
    }
  }

  std::optional<Bytes> get(const std::string& key) override {
    Fd fd(::open(path(key).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (fd.get() < 0) {
      if (errno == ENOENT) return std::nullopt;
      fail("cannot open", path(key));
    }
    Bytes out;
    std::byte buf[65536];
    for (;;) {
      ssize_t n = ::read(fd.get(), buf, sizeof buf);
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("cannot read", path(key));
      }
      if (n == 0) break;
      out.insert(out.end(), buf, buf + n);
      if (out.size() > (64u << 20)) throw StorageError(path(key) + " is too large for a metadata file", EFBIG);
    }
    return out;
  }

  std::optional<uint64_t> size(const std::string& key) override {
    struct stat st;
    if (::lstat(path(key).c_str(), &st) != 0) {
      if (errno == ENOENT) return std::nullopt;
      fail("cannot stat", path(key));
    }
    return static_cast<uint64_t>(st.st_size);
  }

  std::vector<std::string> list(const std::string& prefix) override {
    std::vector<std::string> names;
    std::string dir = path(prefix);
    DIR* d = ::opendir(dir.c_str());
    if (!d) {
      if (errno == ENOENT) return names;
      fail("cannot list", dir);
    }
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n == "." || n == ".." || n.rfind(kTmpPrefix, 0) == 0) continue;
      names.push_back(std::move(n));
    }
    ::closedir(d);
    std::sort(names.begin(), names.end());
    return names;
  }

  void remove_temporaries(const std::string& prefix) override {
    std::string dir = path(prefix);
    DIR* d = ::opendir(dir.c_str());
    if (!d) {
      if (errno == ENOENT) return;
      fail("cannot list", dir);
    }
    std::vector<std::string> junk;
    while (struct dirent* e = ::readdir(d))
      if (std::string(e->d_name).rfind(kTmpPrefix, 0) == 0) junk.push_back(dir + "/" + e->d_name);
    ::closedir(d);
    for (auto& j : junk)
      if (::unlink(j.c_str()) != 0 && errno != ENOENT) fail("cannot remove", j);
  }

  std::unique_ptr<ObjectWriter> create(const std::string& key) override {
    return std::make_unique<LocalWriter>(path(key));
  }

  // Durable before it returns: prune relies on a manifest being gone for
  // good before it deletes the packs only that manifest needed.
  void remove(const std::string& key) override {
    forget_fd(key);
    if (::unlink(path(key).c_str()) != 0) {
      if (errno == ENOENT) return;
      fail("cannot remove", path(key));
    }
    fsync_dir(parent_of(path(key)));
  }

  std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) override {
    make_dirs(parent_of(path(key)));
    Fd fd(::open(path(key).c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (fd.get() < 0) fail("cannot open lock file", path(key));
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK) return nullptr;
      fail("cannot lock", path(key));
    }
    // Best effort: the holder text is only for the message a second writer prints.
    if (::ftruncate(fd.get(), 0) == 0) {
      std::string text = holder + "\n";
      (void)!::pwrite(fd.get(), text.data(), text.size(), 0);
    }
    return std::make_unique<LocalLock>(std::move(fd));
  }

  std::string lock_holder(const std::string& key) override {
    auto b = get(key);
    if (!b) return {};
    std::string s(reinterpret_cast<const char*>(b->data()), b->size());
    while (!s.empty() && (s.back() == '\n' || s.back() == '\0')) s.pop_back();
    return s;
  }

  std::string describe() const override { return root_; }

 private:
  std::string path(const std::string& key) const { return key.empty() ? root_ : root_ + "/" + key; }

  // Pack files are read at random offsets many times a second; opening them
  // once keeps the read path to a single pread.
  int cached_fd(const std::string& key) {
    std::lock_guard g(mu_);
    if (auto it = fds_.find(key); it != fds_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.pos);
      return it->second.fd;
    }
    int fd = ::open(path(key).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) fail("cannot open", path(key));
    if (fds_.size() >= kMaxFds) {
      // Another thread may still be in pread on the evicted descriptor, so it
      // is parked instead of closed; parked ones close with the storage.
      auto& victim = fds_.at(lru_.back());
      parked_.push_back(victim.fd);
      fds_.erase(lru_.back());
      lru_.pop_back();
      if (parked_.size() > kMaxFds) {
        ::close(parked_.front());
        parked_.erase(parked_.begin());
      }
    }
    lru_.push_front(key);
    fds_[key] = Entry{fd, lru_.begin()};
    return fd;
  }

  void forget_fd(const std::string& key) {
    std::lock_guard g(mu_);
    if (auto it = fds_.find(key); it != fds_.end()) {
      parked_.push_back(it->second.fd);
      lru_.erase(it->second.pos);
      fds_.erase(it);
    }
  }

  static constexpr size_t kMaxFds = 256;
  struct Entry {
    int fd;
    std::list<std::string>::iterator pos;
  };
  std::string root_;
  std::mutex mu_;
  std::unordered_map<std::string, Entry> fds_;
  std::list<std::string> lru_;
  std::vector<int> parked_;
};

}  // namespace

std::unique_ptr<Storage> open_local_storage(const std::string& root) { return std::make_unique<LocalStorage>(root); }

}  // namespace cbtfs
