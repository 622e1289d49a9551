// Local-directory implementation of the Storage interface.
// Invariant: a key's file appears only through renameat2(RENAME_NOREPLACE) of
// a fully written and fsync'ed temporary in the same directory, followed by an
// fsync of that directory; temporaries start with ".tmp." and are never listed.
// Every path is resolved below the repository's root with openat2(2)
// RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS: a symbolic link anywhere inside the
// repository (a swapped directory, a planted file) is refused, never followed.
#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <random>
#include <unordered_map>
#include <utility>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"
#include "cbtfs/storage.hpp"
#include "file_appender.hpp"

namespace cbtfs {
namespace {

constexpr const char* kTmpPrefix = ".tmp.";

[[noreturn]] void fail(const std::string& what, const std::string& path, int err = errno) {
  throw StorageError(what + " " + path + ": " + std::strerror(err), err);
}

// A writer names its unfinished file ".tmp.<name>.<pid>.<random>" and
// removes it when it stops, even on SIGTERM; one killed leaves it behind. A
// writer still running (an import next to a verify) leaves nothing yet.
bool is_leftover(const std::string& name) {
  if (name.rfind(kTmpPrefix, 0) != 0) return false;
  auto end = name.rfind('.');
  auto start = end == 0 ? std::string::npos : name.rfind('.', end - 1);
  if (start == std::string::npos) return true;
  long pid = std::strtol(name.c_str() + start + 1, nullptr, 10);
  return !(pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM));
}

// ".tmp.<name>.<pid>.<random>" back to <name>; "" for anything else.
std::string committed_name(const std::string& tmp) {
  if (tmp.rfind(kTmpPrefix, 0) != 0) return {};
  auto end = tmp.rfind('.');
  if (end == std::string::npos || end == 0) return {};
  auto start = tmp.rfind('.', end - 1);
  size_t from = std::string(kTmpPrefix).size();
  if (start == std::string::npos || start <= from) return {};
  return tmp.substr(from, start - from);
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      if (fd_ >= 0) ::close(fd_);
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

std::string parent_of(const std::string& key) {
  auto slash = key.rfind('/');
  return slash == std::string::npos ? "" : key.substr(0, slash);
}

std::string base_of(const std::string& key) {
  auto slash = key.rfind('/');
  return slash == std::string::npos ? key : key.substr(slash + 1);
}

// The repository's root, and every path below it resolved without links.
class Root {
 public:
  explicit Root(std::string root) : root_(std::move(root)) {
    while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
    fd_ = Fd(::open(root_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (fd_.get() < 0) fail("cannot access repository", root_);
  }
  const std::string& str() const { return root_; }
  std::string path(const std::string& key) const { return key.empty() ? root_ : root_ + "/" + key; }

  // -1 with errno set, like open(2). ELOOP means a link was met.
  int open(const std::string& key, int flags, mode_t mode = 0) const {
    open_how how{};
    how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
    how.mode = (flags & O_CREAT) ? mode : 0;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS;
    long fd = ::syscall(SYS_openat2, fd_.get(), key.empty() ? "." : key.c_str(), &how, sizeof how);
    if (fd < 0 && errno == ENOSYS)  // before Linux 5.6: the last component at least
      fd = ::openat(fd_.get(), key.empty() ? "." : key.c_str(), flags | O_CLOEXEC | O_NOFOLLOW, mode);
    return static_cast<int>(fd);
  }

  // Like open(), but failing with a message that says what went wrong.
  Fd must_open(const std::string& key, int flags, const char* what, mode_t mode = 0) const {
    Fd fd(open(key, flags, mode));
    if (fd.get() < 0) fail_at(what, key);
    return fd;
  }
  Fd dir(const std::string& key) const { return must_open(key, O_RDONLY | O_DIRECTORY, "cannot open directory"); }

  [[noreturn]] void fail_at(const std::string& what, const std::string& key, int err = errno) const {
    if (err == ELOOP || err == EXDEV)
      throw StorageError(path(key) + " is, or lies below, a symbolic link or a mount point inside the repository; "
                                     "cbtfs does not follow those",
                         err);
    fail(what, path(key), err);
  }

  // mkdir -p below the root, fsync'ing each parent that got a new entry so
  // the new directories survive a power loss with what goes into them.
  void make_dirs(const std::string& key) const {
    if (key.empty()) return;
    Fd fd(open(key, O_RDONLY | O_DIRECTORY));
    if (fd.get() >= 0) return;
    if (errno != ENOENT) fail_at("cannot open directory", key);
    make_dirs(parent_of(key));
    Fd parent = dir(parent_of(key));
    if (::mkdirat(parent.get(), base_of(key).c_str(), 0700) != 0 && errno != EEXIST)
      fail_at("cannot create directory", key);
    if (::fsync(parent.get()) != 0) fail_at("cannot fsync directory", parent_of(key));
  }

 private:
  std::string root_;
  Fd fd_;
};

class LocalWriter final : public ObjectWriter {
 public:
  LocalWriter(const Root& root, std::string key) : root_(root), key_(std::move(key)) {
    root_.make_dirs(parent_of(key_));
    dir_ = root_.dir(parent_of(key_));
    std::random_device rd;
    tmp_ = kTmpPrefix + base_of(key_) + "." + std::to_string(::getpid()) + "." + std::to_string(rd());
    fd_ = ::openat(dir_.get(), tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd_ < 0) fail("cannot create", root_.path(parent_of(key_)) + "/" + tmp_);
    out_ = std::make_unique<FileAppender>(fd_, root_.path(key_));
  }
  ~LocalWriter() override {
    out_.reset();  // its thread stops before the file closes
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlinkat(dir_.get(), tmp_.c_str(), 0);
  }
  void append(std::span<const std::byte> data) override { out_->append(data); }
  void append(Bytes&& data) override { out_->append(data); }
  uint64_t size() const override { return out_->size(); }
  void commit() override {
    out_->finish();
    if (::fsync(fd_) != 0) fail("cannot fsync", root_.path(key_));
    ::close(std::exchange(fd_, -1));
    if (::renameat2(dir_.get(), tmp_.c_str(), dir_.get(), base_of(key_).c_str(), RENAME_NOREPLACE) != 0) {
      int err = errno;
      if (err == EEXIST) fail("refusing to overwrite", root_.path(key_), err);
      fail("cannot rename into place", root_.path(key_), err);
    }
    committed_ = true;
    if (::fsync(dir_.get()) != 0) fail("cannot fsync directory", root_.path(parent_of(key_)));
  }

 private:
  const Root& root_;
  std::string key_, tmp_;
  Fd dir_;
  int fd_ = -1;
  std::unique_ptr<FileAppender> out_;
  bool committed_ = false;
};

// flock(2) on a file: released when the descriptor closes or the process dies.
class LocalClaim final : public Claim {
 public:
  explicit LocalClaim(Fd fd) : fd_(std::move(fd)) {}

 private:
  Fd fd_;
};

class LocalLock final : public StorageLock {
 public:
  explicit LocalLock(Fd fd) : fd_(std::move(fd)) {}

 private:
  Fd fd_;  // flock is released when the descriptor closes or the process dies
};

class LocalStorage final : public Storage {
 public:
  explicit LocalStorage(std::string root) : root_(std::move(root)) {}

  void read(const std::string& key, uint64_t offset, std::span<std::byte> out) override {
    auto open_file = cached_fd(key);  // held: evicted meanwhile, it closes after this read
    auto r = io::read_all(open_file->get(), out.data(), out.size(), static_cast<int64_t>(offset));
    if (r.error) fail("cannot read", path(key), r.error);
    if (r.bytes < out.size())
      throw FormatError("short read from " + path(key) + " at offset " + std::to_string(offset + r.bytes) +
                        ": the file is truncated");
  }

  std::optional<Bytes> get(const std::string& key) override {
    Fd fd(root_.open(key, O_RDONLY));
    if (fd.get() < 0) {
      if (errno == ENOENT) return std::nullopt;
      root_.fail_at("cannot open", key);
    }
    Bytes out;
    std::byte buf[65536];
    for (;;) {
      auto r = io::read_all(fd.get(), buf, sizeof buf);
      if (r.error) fail("cannot read", path(key), r.error);
      out.insert(out.end(), buf, buf + r.bytes);
      if (r.bytes < sizeof buf) break;
      if (out.size() > (64u << 20)) throw StorageError(path(key) + " is too large for a metadata file", EFBIG);
    }
    return out;
  }

  std::optional<uint64_t> size(const std::string& key) override {
    Fd fd(root_.open(key, O_PATH));
    struct stat st;
    if (fd.get() < 0) {
      if (errno == ENOENT) return std::nullopt;
      root_.fail_at("cannot stat", key);
    }
    if (::fstat(fd.get(), &st) != 0) root_.fail_at("cannot stat", key);
    return static_cast<uint64_t>(st.st_size);
  }

  std::vector<std::string> list(const std::string& prefix) override {
    std::vector<std::string> names;
    DIR* d = open_dir(prefix);
    if (!d) return names;
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
    DIR* d = open_dir(prefix);
    if (!d) return;
    std::vector<std::string> junk;
    while (struct dirent* e = ::readdir(d))
      if (std::string(e->d_name).rfind(kTmpPrefix, 0) == 0) junk.push_back(e->d_name);
    for (auto& j : junk)
      if (::unlinkat(::dirfd(d), j.c_str(), 0) != 0 && errno != ENOENT) {
        int err = errno;
        ::closedir(d);
        root_.fail_at("cannot remove", prefix + "/" + j, err);
      }
    ::closedir(d);
  }

  size_t leftovers(const std::string& prefix) override {
    DIR* d = open_dir(prefix);
    if (!d) return 0;
    size_t n = 0;
    while (struct dirent* e = ::readdir(d)) n += is_leftover(e->d_name);
    ::closedir(d);
    return n;
  }

  std::vector<std::string> unfinished(const std::string& prefix) override {
    std::vector<std::string> keys;
    DIR* d = open_dir(prefix);
    if (!d) return keys;
    std::vector<std::string> subdirs;
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n == "." || n == "..") continue;
      if (is_leftover(n)) {
        if (auto base = committed_name(n); !base.empty()) keys.push_back(prefix + "/" + base);
      } else if (n.rfind(kTmpPrefix, 0) != 0) {
        struct stat sb;
        bool dir = e->d_type == DT_DIR ||
                   (e->d_type == DT_UNKNOWN && ::fstatat(::dirfd(d), n.c_str(), &sb, AT_SYMLINK_NOFOLLOW) == 0 &&
                    S_ISDIR(sb.st_mode));
        if (dir) subdirs.push_back(n);
      }
    }
    ::closedir(d);
    for (auto& sub : subdirs)
      for (auto& k : unfinished(prefix + "/" + sub)) keys.push_back(std::move(k));
    return keys;
  }

  void drop_unfinished(const std::string& key) override {
    DIR* d = open_dir(parent_of(key));
    if (!d) return;
    std::vector<std::string> junk;
    while (struct dirent* e = ::readdir(d))
      if (is_leftover(e->d_name) && committed_name(e->d_name) == base_of(key)) junk.push_back(e->d_name);
    for (auto& j : junk)
      if (::unlinkat(::dirfd(d), j.c_str(), 0) != 0 && errno != ENOENT) {
        int err = errno;
        ::closedir(d);
        root_.fail_at("cannot remove", parent_of(key) + "/" + j, err);
      }
    ::closedir(d);
  }

  std::unique_ptr<ObjectWriter> create(const std::string& key) override {
    return std::make_unique<LocalWriter>(root_, key);
  }

  // Durable before it returns: prune relies on a manifest being gone for
  // good before it deletes the packs only that manifest needed.
  void remove(const std::string& key) override {
    forget_fd(key);
    Fd dir(root_.open(parent_of(key), O_RDONLY | O_DIRECTORY));
    if (dir.get() < 0) {
      if (errno == ENOENT) return;
      root_.fail_at("cannot open directory", parent_of(key));
    }
    if (::unlinkat(dir.get(), base_of(key).c_str(), 0) != 0) {
      if (errno == ENOENT) return;
      root_.fail_at("cannot remove", key);
    }
    if (::fsync(dir.get()) != 0) root_.fail_at("cannot fsync directory", parent_of(key));
  }

  // Whole file-system blocks inside the range become a hole (punching is
  // done in 4 KiB units: what the file systems cbtfs runs on use).
  uint64_t discard(const std::string& key, uint64_t offset, uint64_t length) override {
    uint64_t n = discardable(key, offset, length);
    if (!n) return 0;
    Fd fd = root_.must_open(key, O_WRONLY, "cannot open");
    uint64_t first = (offset + kPunch - 1) / kPunch * kPunch;
    if (::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(first),
                    static_cast<off_t>(n)) != 0) {
      if (errno == EOPNOTSUPP) return 0;
      root_.fail_at("cannot free space in", key);
    }
    return n;
  }
  uint64_t discardable(const std::string&, uint64_t offset, uint64_t length) override {
    uint64_t first = (offset + kPunch - 1) / kPunch * kPunch, end = (offset + length) / kPunch * kPunch;
    return end > first ? end - first : 0;
  }

  std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) override {
    root_.make_dirs(parent_of(key));
    Fd fd = root_.must_open(key, O_RDWR | O_CREAT, "cannot open lock file", 0600);
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

  std::unique_ptr<Claim> claim_shared(const std::string& key) override { return claim(key, LOCK_SH); }
  std::unique_ptr<Claim> claim_exclusive(const std::string& key) override { return claim(key, LOCK_EX); }

  std::string describe() const override { return root_.str(); }

 private:
  std::string path(const std::string& key) const { return root_.path(key); }

  // flock(2) on the object itself: nothing is written, so a read-only
  // repository or a read-only mount can claim too. nullptr when the object
  // is gone or the other kind of claim holds it.
  std::unique_ptr<Claim> claim(const std::string& key, int how) {
    Fd fd(root_.open(key, O_RDONLY));
    if (fd.get() < 0) {
      if (errno == ENOENT) return nullptr;
      root_.fail_at("cannot open", key);
    }
    if (::flock(fd.get(), how | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK) return nullptr;
      fail("cannot lock", path(key));
    }
    return std::make_unique<LocalClaim>(std::move(fd));
  }

  // nullptr when the directory does not exist.
  DIR* open_dir(const std::string& key) {
    int fd = root_.open(key, O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
      if (errno == ENOENT) return nullptr;
      root_.fail_at("cannot list", key);
    }
    DIR* d = ::fdopendir(fd);
    if (!d) {
      ::close(fd);
      root_.fail_at("cannot list", key);
    }
    return d;
  }

  // Pack files are read at random offsets many times a second; opening them
  // once keeps the read path to a single pread. A descriptor is shared with
  // the reads using it, so evicting it never closes it under one.
  std::shared_ptr<Fd> cached_fd(const std::string& key) {
    std::lock_guard g(mu_);
    sweep_removed();
    if (auto it = fds_.find(key); it != fds_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.pos);
      return it->second.fd;
    }
    auto fd = std::make_shared<Fd>(root_.open(key, O_RDONLY));
    if (fd->get() < 0) root_.fail_at("cannot open", key);
    if (fds_.size() >= kMaxFds) {
      fds_.erase(lru_.back());
      lru_.pop_back();
    }
    lru_.push_front(key);
    fds_[key] = Entry{fd, lru_.begin()};
    return fd;
  }

  void forget_fd(const std::string& key) {
    std::lock_guard g(mu_);
    if (auto it = fds_.find(key); it != fds_.end()) {
      lru_.erase(it->second.pos);
      fds_.erase(it);
    }
  }

  // Another process (prune) may have removed files we hold open: their
  // space comes back only once we close them, so a long-lived mount looks
  // at most once a second. Caller holds mu_.
  void sweep_removed() {
    auto now = std::chrono::steady_clock::now();
    if (now - last_sweep_ < std::chrono::seconds(1)) return;
    last_sweep_ = now;
    for (auto it = fds_.begin(); it != fds_.end();) {
      struct stat st;
      if (::fstat(it->second.fd->get(), &st) == 0 && st.st_nlink == 0) {
        lru_.erase(it->second.pos);
        it = fds_.erase(it);
      } else {
        ++it;
      }
    }
  }

  static constexpr size_t kMaxFds = 256;
  static constexpr uint64_t kPunch = 4096;
  struct Entry {
    std::shared_ptr<Fd> fd;
    std::list<std::string>::iterator pos;
  };
  Root root_;
  std::mutex mu_;
  std::unordered_map<std::string, Entry> fds_;
  std::list<std::string> lru_;
  std::chrono::steady_clock::time_point last_sweep_{};
};

}  // namespace

std::unique_ptr<Storage> open_local_storage(const std::string& root) { return std::make_unique<LocalStorage>(root); }

}  // namespace cbtfs
