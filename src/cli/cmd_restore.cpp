// cbtfs-repo restore REPO VDI POINT DEST: a point to a file or block device.
// Every block is checksum-verified on the way; holes stay holes in a file.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"
#include "cbtfs/point_reader.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

namespace {

void write_all(int fd, const std::byte* p, size_t n, uint64_t off, const std::string& dest) {
  if (auto r = io::write_all(fd, p, n, static_cast<int64_t>(off)); r.error)
    throw StorageError("cannot write " + dest + ": " + std::strerror(r.error), r.error);
}

}  // namespace

ManifestPtr find_point(Repository& repo, const std::string& vdi, const std::string& point) {
  auto pl = repo.points(vdi);
  if (pl.points.empty()) throw UsageError("no VDI " + vdi + " in the repository");
  if (point == "latest" || point == "latest.raw") return pl.points.back();
  std::string name = point;
  if (name.size() > 4 && name.compare(name.size() - 4, 4, ".raw") == 0) name.resize(name.size() - 4);
  for (auto& m : pl.points)
    if (format_point_name(m->time) == name || format_iso_time(m->time) == name) return m;
  try {  // any spelling of the time parse_time accepts
    int64_t t = parse_time(name);
    for (auto& m : pl.points)
      if (m->time == t) return m;
  } catch (const UsageError&) {
  }
  throw UsageError("VDI " + vdi + " has no point '" + point + "' (see cbtfs-repo ls)");
}

int cmd_restore(const std::string& path, const std::string& vdi, const std::string& point, const std::string& dest,
                bool force) {
  auto repo = open_repository(path);
  ManifestPtr m = find_point(*repo, vdi, point);
  auto hold = repo->hold_point(*m);  // a prune meanwhile keeps the point until we are done
  if (!hold) throw UsageError("point " + format_point_name(m->time) + " of VDI " + vdi + " was just removed");
  struct stat st{};
  bool exists = ::stat(dest.c_str(), &st) == 0;
  bool device = exists && S_ISBLK(st.st_mode);
  if (exists && !device && !force) throw UsageError(dest + " exists; give --force to overwrite it");
  int fd = ::open(dest.c_str(), O_WRONLY | O_CLOEXEC | (device ? 0 : O_CREAT | O_TRUNC), 0600);
  if (fd < 0) throw StorageError("cannot open " + dest + ": " + std::strerror(errno), errno);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (device) {
    uint64_t dev_size = 0;
    if (::ioctl(fd, BLKGETSIZE64, &dev_size) != 0 || dev_size < m->virtual_size)
      throw UsageError(dest + " is smaller than the point (" + std::to_string(m->virtual_size) + " bytes)");
  } else if (::ftruncate(fd, static_cast<off_t>(m->virtual_size)) != 0) {
    throw StorageError("cannot size " + dest + ": " + std::strerror(errno), errno);
  }

  // A half-written file must not pass for a restored disk.
  struct RemoveOnFailure {
    const std::string& path;
    bool armed;
    ~RemoveOnFailure() {
      if (armed) ::unlink(path.c_str());
    }
  } cleanup{dest, !device};
  PointReader reader(repo, m);
  constexpr size_t kChunk = 4 << 20;
  // The map of data and holes first (the index alone), then the data read,
  // verified and written by a few threads at once: decompression and
  // checksums are CPU work, and pwrite needs no order.
  std::vector<std::pair<uint64_t, uint64_t>> work;  // (offset, length) of data
  Bytes zeros(device ? kChunk : 0);
  auto zero_fill = [&](uint64_t from, uint64_t to) {  // a hole: a file keeps it, a device gets zeros
    for (uint64_t z = from; device && z < to; z += kChunk)
      write_all(fd, zeros.data(), std::min<uint64_t>(kChunk, to - z), z, dest);
  };
  uint64_t pos = 0;
  for (auto& e : reader.data_extents()) {
    zero_fill(pos, e.offset);
    uint64_t end = e.offset + e.length;
    for (uint64_t p = e.offset; p < end; p += kChunk) work.emplace_back(p, std::min<uint64_t>(kChunk, end - p));
    pos = end;
  }
  zero_fill(pos, m->virtual_size);
  Progress progress("restore " + format_point_name(m->time), m->virtual_size);
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  std::mutex mu;
  std::exception_ptr failure;
  auto worker = [&] {
    Bytes buf(kChunk);
    try {
      for (size_t i; (i = next++) < work.size();) {
        auto [pos, len] = work[i];
        size_t n = reader.read(pos, {buf.data(), static_cast<size_t>(len)});
        write_all(fd, buf.data(), n, pos, dest);
        done += n;
        std::lock_guard g(mu);
        progress.update(done);
      }
    } catch (...) {
      std::lock_guard g(mu);
      if (!failure) failure = std::current_exception();
      next = work.size();  // the others stop too
    }
  };
  std::vector<std::thread> threads;
  unsigned n = std::clamp(std::thread::hardware_concurrency(), 2u, 4u);
  for (unsigned i = 0; i < n; ++i) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  if (failure) std::rethrow_exception(failure);
  if (::fsync(fd) != 0) throw StorageError("cannot flush " + dest + ": " + std::strerror(errno), errno);
  progress.finish();
  cleanup.armed = false;
  std::printf("restored %s of VDI %s to %s (%s)\n", format_point_name(m->time).c_str(), vdi.c_str(), dest.c_str(),
              human_bytes(m->virtual_size).c_str());
  return kExitOk;
}

}  // namespace cbtfs
