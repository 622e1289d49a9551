// cbtfs-repo import: a raw image (file, block device, or a pipe with
// --size) as the next point of a VDI. Every block is compared with the
// latest point, so the result is a delta exactly when the image is a later
// state of that disk.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "cbtfs/errors.hpp"
#include "cbtfs/point_writer.hpp"
#include "commands.hpp"
#include "progress.hpp"
#include "text.hpp"

namespace cbtfs {

namespace {

constexpr size_t kChunk = 64 * kBlockSize;  // 4 MiB reads

// SIGINT and SIGTERM stop an import cleanly: the copy loop notices them
// and throws, so the unwinding point writer discards its uncommitted pack
// (the temporary file, or the multipart upload on S3) instead of leaving it
// to the next run. They stay blocked except while the loop waits for a
// pipe, so the writer's threads (which inherit the mask) never see EINTR
// and a signal is only ever taken where the loop can act on it.
volatile sig_atomic_t g_signal = 0;

void on_signal(int sig) { g_signal = sig; }

struct Interrupted {
  int sig;
};

class StopOnSignals {
 public:
  StopOnSignals() {
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigemptyset(&stops_);
    for (auto [sig, old] : {std::pair{SIGINT, &old_int_}, std::pair{SIGTERM, &old_term_}}) {
      sigaction(sig, &sa, old);
      // An ignored signal stays ignored (a background job of a script ignores SIGINT).
      if (old->sa_handler == SIG_IGN)
        sigaction(sig, old, nullptr);
      else
        sigaddset(&stops_, sig);
    }
    pthread_sigmask(SIG_BLOCK, &stops_, &old_mask_);
  }
  ~StopOnSignals() { restore(); }
  void restore() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
  }
  // Throws Interrupted when SIGINT or SIGTERM came (it is then consumed).
  void check() const {
    timespec now{0, 0};
    if (int sig = sigtimedwait(&stops_, nullptr, &now); sig > 0) g_signal = sig;
    if (g_signal) throw Interrupted{g_signal};
  }
  // Waits until fd can be read, or a stop signal came.
  void wait_readable(int fd) const {
    pollfd p{fd, POLLIN, 0};
    while (::ppoll(&p, 1, nullptr, &old_mask_) < 0) {  // the stop signals open only here
      if (errno != EINTR) throw StorageError(std::string("cannot wait for input: ") + std::strerror(errno), errno);
      check();
    }
    check();
  }

 private:
  struct sigaction old_int_ {}, old_term_ {};
  sigset_t stops_{}, old_mask_{};
};

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { ::close(fd_); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

struct Image {
  uint64_t size;
  bool seekable;  // a file or block device; else a pipe or stream, read once in order
};

// Reads up to len bytes at off (or, with off < 0, from where the stream
// is); fewer only at the end of the input.
size_t read_full(const StopOnSignals& stop, int fd, int64_t off, std::byte* out, size_t len, const std::string& path) {
  size_t done = 0;
  while (done < len) {
    if (off < 0) stop.wait_readable(fd);  // a stalled pipe must not make the import deaf
    ssize_t n = off < 0 ? ::read(fd, out + done, len - done)
                        : ::pread(fd, out + done, len - done, static_cast<off_t>(off + static_cast<int64_t>(done)));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw StorageError("cannot read " + path + ": " + std::strerror(errno), errno);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Image size_image(int fd, const ImportArgs& a) {
  struct stat st;
  if (::fstat(fd, &st) != 0) throw StorageError("cannot stat " + a.image + ": " + std::strerror(errno), errno);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    if (!a.size)
      throw UsageError(a.image + " is a pipe or a stream: its size cannot be known before it is read; give "
                       "--size BYTES (the disk's virtual size, e.g. --size 10G)");
    return {*a.size, false};
  }
  off_t end = ::lseek(fd, 0, SEEK_END);
  if (end < 0) throw StorageError("cannot size " + a.image + ": " + std::strerror(errno), errno);
  auto size = static_cast<uint64_t>(end);
  if (a.size && *a.size != size)
    throw UsageError("--size " + std::to_string(*a.size) + " does not match " + a.image + ", which has " +
                     std::to_string(size) + " bytes");
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  return {size, true};
}

// A file or block device: holes of a sparse image are skipped without
// reading; where the parent had data there, the writer records zeros.
void copy_seekable(const StopOnSignals& stop, int fd, const ImportArgs& a, uint64_t size, PointWriter& w,
                   Progress& progress) {
  Bytes buf(kChunk);
  const uint64_t nblocks = w.block_count();
  uint64_t b = 0;
  while (b < nblocks) {
    stop.check();
    uint64_t pos = b * kBlockSize;
    off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    uint64_t data_pos = pos;  // file systems without SEEK_DATA: read everything
    if (data >= 0)
      data_pos = static_cast<uint64_t>(data);
    else if (errno == ENXIO)
      data_pos = size;  // only a hole remains
    else if (errno != EINVAL && errno != EOPNOTSUPP)
      throw StorageError("cannot seek in " + a.image + ": " + std::strerror(errno), errno);
    uint64_t data_block = data_pos / kBlockSize;
    if (data_block > b) {
      w.put_zeros(b, data_block);
      b = data_block;
      continue;
    }
    size_t n = read_full(stop, fd, static_cast<int64_t>(pos), buf.data(), kChunk, a.image);
    if (n == 0) throw StorageError(a.image + " shrank while being imported", EIO);
    size_t blocks = (n + kBlockSize - 1) / kBlockSize;
    if (n % kBlockSize) std::memset(buf.data() + n, 0, blocks * kBlockSize - n);
    for (size_t i = 0; i < blocks && b < nblocks; ++i, ++b) w.put_block(b, {buf.data() + i * kBlockSize, kBlockSize});
    progress.update(b * kBlockSize);
  }
}

// A pipe: read once, in order, exactly --size bytes.
void copy_stream(const StopOnSignals& stop, int fd, const ImportArgs& a, uint64_t size, PointWriter& w,
                 Progress& progress) {
  Bytes buf(kChunk);
  uint64_t pos = 0, b = 0;
  while (pos < size) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(kChunk, size - pos));
    size_t n = read_full(stop, fd, -1, buf.data(), want, a.image);
    pos += n;
    if (n < want)
      throw UsageError(a.image + " ended after " + std::to_string(pos) + " bytes, but --size said " +
                       std::to_string(size) + "; nothing was committed");
    size_t blocks = (n + kBlockSize - 1) / kBlockSize;
    if (n % kBlockSize) std::memset(buf.data() + n, 0, blocks * kBlockSize - n);
    for (size_t i = 0; i < blocks; ++i, ++b) w.put_block(b, {buf.data() + i * kBlockSize, kBlockSize});
    progress.update(pos);
  }
  std::byte extra;
  if (read_full(stop, fd, -1, &extra, 1, a.image) != 0)
    throw UsageError(a.image + " is longer than --size " + std::to_string(size) + "; nothing was committed");
}

std::string describe_vdi(const std::string& vdi, const Manifest& m) {
  return "VDI " + vdi + " (VM '" + printable(m.vm_name) + "', disk '" + printable(m.vdi_name) + "', latest point " +
         format_iso_time(m.time) + ")";
}

// Without --vdi, the names say which VDI the image is a later state of: a
// second import of the same disk must not start a second VDI of the same
// names, whose points would be full copies next to the first one's.
std::string choose_vdi(Repository& repo, const ImportArgs& a) {
  if (!a.vdi.empty()) return a.vdi;
  if (a.vm_name.empty() && a.vdi_name.empty()) return random_uuid();
  std::vector<std::pair<std::string, ManifestPtr>> same;
  for (auto& vdi : repo.vdis()) {
    auto m = repo.latest(vdi);
    if (m && (a.vm_name.empty() || m->vm_name == a.vm_name) && (a.vdi_name.empty() || m->vdi_name == a.vdi_name))
      same.emplace_back(vdi, m);
  }
  if (same.empty()) return random_uuid();
  if (same.size() > 1) {
    std::string list;
    for (auto& [vdi, m] : same) list += "\n  " + describe_vdi(vdi, *m);
    throw UsageError(std::to_string(same.size()) + " VDIs have these names; give --vdi UUID (one of them, or a new "
                     "uuid for a new VDI):" + list);
  }
  if (!a.quiet)
    std::fprintf(stderr, "cbtfs-repo: adding to %s, the one VDI with these names (give --vdi to choose)\n",
                 describe_vdi(same[0].first, *same[0].second).c_str());
  return same[0].first;
}

int import_image(const StopOnSignals& stop, const ImportArgs& a) {
  int raw = ::open(a.image.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw < 0) throw UsageError("cannot open image " + a.image + ": " + std::strerror(errno));
  Fd fd(raw);
  Image img = size_image(fd.get(), a);

  auto repo = open_repository(a.repo);
  std::string vdi = choose_vdi(*repo, a);
  PointInfo info;
  info.time = a.time.empty() ? static_cast<int64_t>(std::time(nullptr)) : parse_time(a.time);
  info.virtual_size = img.size;
  info.vdi_name = a.vdi_name;
  info.vm_name = a.vm_name;
  auto prev = repo->latest(vdi);
  if (prev) {  // names default to the VDI's current ones
    if (info.vdi_name.empty()) info.vdi_name = prev->vdi_name;
    if (info.vm_name.empty()) info.vm_name = prev->vm_name;
  }
  PointWriter w(repo, vdi, info, holder_text("cbtfs-repo import"));
  Progress progress("import " + vdi.substr(0, 8), img.size);
  if (img.seekable)
    copy_seekable(stop, fd.get(), a, img.size, w, progress);
  else
    copy_stream(stop, fd.get(), a, img.size, w, progress);
  progress.finish();
  stop.check();
  Manifest m = w.commit();
  merge_index_after_writing(*repo, "cbtfs-repo import");
  if (a.quiet && a.vdi.empty()) std::printf("%s\n", vdi.c_str());  // scripts need the uuid
  if (!a.quiet) {
    std::printf("%s point %s of VDI %s: %llu blocks stored, %s written%s\n", m.parent ? "delta" : "full",
                format_point_name(m.time).c_str(), vdi.c_str(), static_cast<unsigned long long>(m.blocks_written),
                human_bytes(m.bytes_stored).c_str(),
                m.chain_reason.empty() ? "" : (" (new chain: " + m.chain_reason + ")").c_str());
  }
  return kExitOk;
}

}  // namespace

int cmd_import(const ImportArgs& a) {
  StopOnSignals stop;
  try {
    return import_image(stop, a);
  } catch (const Interrupted& i) {
    // The writer is gone by now, and its temporary with it.
    std::fprintf(stderr, "cbtfs-repo: import interrupted by %s: nothing was committed, nothing left behind\n",
                 strsignal(i.sig));
    // Die of the signal, as the caller (a shell loop, systemd) expects.
    stop.restore();
    std::signal(i.sig, SIG_DFL);
    std::raise(i.sig);
    return kExitFailed;
  }
}

int cmd_init(const InitArgs& a) {
  std::vector<Unlocker> keys;
  if (a.encryption != "none") {
    auto kind = a.encryption == "passphrase" ? Unlocker::Kind::passphrase : Unlocker::Kind::keyfile;
    for (auto& u : unlockers_from_environment())
      if (u.kind == kind) keys.push_back(std::move(u));
    if (keys.empty())
      throw UsageError(a.encryption == "passphrase"
                           ? "--encryption passphrase: give the passphrase with --passphrase-file FILE (or "
                             "CBTFS_PASSPHRASE_FILE, CBTFS_PASSPHRASE)"
                           : "--encryption keyfile: give the key file with --key-file FILE (or CBTFS_KEY_FILE); "
                             "make one with: head -c 32 /dev/urandom > FILE");
    keys.resize(1);
  }
  auto cipher = parse_cipher(a.cipher);
  if (!cipher) throw UsageError("--cipher: aes-256-ocb or aes-256-gcm, not " + a.cipher);
  Repository::init(a.repo, a.format, keys, *cipher);
  std::printf("created cbtfs repository %s (format %u%s)\n", a.repo.c_str(), a.format,
              keys.empty() ? "" : (", encrypted with " + a.cipher + ", one " + a.encryption + " key slot").c_str());
  if (!keys.empty())
    std::printf("keep the %s safe and apart from the repository: without it nothing stored can be read\n",
                a.encryption == "passphrase" ? "passphrase" : "key file");
  return kExitOk;
}

}  // namespace cbtfs
