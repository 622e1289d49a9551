// cbtfs-repo import: a raw image (file or block device) as the next point of
// a VDI. Every block is compared with the latest point by checksum, so the
// result is a delta exactly when the image is a later state of that disk.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "cbtfs/errors.hpp"
#include "cbtfs/repository.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

namespace {

// Reads up to out.size() bytes at off; fewer only at the end of the image.
size_t read_full(int fd, uint64_t off, std::byte* out, size_t len, const std::string& path) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, out + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw StorageError("cannot read " + path + ": " + std::strerror(errno), errno);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

}  // namespace

int cmd_import(const ImportArgs& a) {
  int fd = ::open(a.image.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw StorageError("cannot open image " + a.image + ": " + std::strerror(errno), errno);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  off_t end = ::lseek(fd, 0, SEEK_END);
  if (end < 0) throw StorageError("cannot size " + a.image + ": " + std::strerror(errno), errno);
  auto size = static_cast<uint64_t>(end);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);

  auto repo = Repository::open(a.repo);
  std::string vdi = a.vdi.empty() ? random_uuid() : a.vdi;
  PointInfo info;
  info.time = a.time.empty() ? static_cast<int64_t>(std::time(nullptr)) : parse_time(a.time);
  info.virtual_size = size;
  info.vdi_name = a.vdi_name;
  info.vm_name = a.vm_name;
  auto prev = repo->latest(vdi);
  if (prev) {  // names default to the VDI's current ones
    if (info.vdi_name.empty()) info.vdi_name = prev->vdi_name;
    if (info.vm_name.empty()) info.vm_name = prev->vm_name;
  }
  PointWriter w(repo, vdi, info, holder_text("cbtfs-repo import"));

  // Holes of a sparse image are skipped without reading; where the parent
  // had data there, the writer records zeros.
  constexpr size_t kChunk = 64 * kBlockSize;  // 4 MiB reads
  Bytes buf(kChunk);
  Progress progress("import " + vdi.substr(0, 8), size);
  const uint64_t nblocks = w.block_count();
  uint64_t b = 0;
  while (b < nblocks) {
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
    size_t n = read_full(fd, pos, buf.data(), kChunk, a.image);
    if (n == 0) throw StorageError(a.image + " shrank while being imported", EIO);
    size_t blocks = (n + kBlockSize - 1) / kBlockSize;
    if (n % kBlockSize) std::memset(buf.data() + n, 0, blocks * kBlockSize - n);
    for (size_t i = 0; i < blocks && b < nblocks; ++i, ++b) w.put_block(b, {buf.data() + i * kBlockSize, kBlockSize});
    progress.update(b * kBlockSize);
  }
  progress.finish();
  Manifest m = w.commit();
  if (a.quiet && a.vdi.empty()) std::printf("%s\n", vdi.c_str());  // scripts need the new uuid
  if (!a.quiet) {
    std::printf("%s point %s of VDI %s: %llu blocks stored, %s written%s\n", m.parent ? "delta" : "full",
                format_point_name(m.time).c_str(), vdi.c_str(), static_cast<unsigned long long>(m.blocks_written),
                human_bytes(m.bytes_stored).c_str(),
                m.chain_reason.empty() ? "" : (" (new chain: " + m.chain_reason + ")").c_str());
  }
  return kExitOk;
}

int cmd_init(const std::string& repo) {
  Repository::init(repo);
  std::printf("created cbtfs repository %s\n", repo.c_str());
  return kExitOk;
}

}  // namespace cbtfs
