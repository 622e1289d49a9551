// The FUSE callbacks, called as the kernel calls them but without a mount:
// offsets past 4 GiB must survive every conversion between the kernel's
// off_t, the callbacks' int/off_t results and the reader's uint64_t.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "fuse/fuse_ops.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;

namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint64_t kDiskSize = 6 * kGiB;
constexpr uint64_t kDataAt = 5 * kGiB + 7 * kBlockSize;  // far past 4 GiB: no 32-bit offset reaches it
constexpr uint64_t kPartStart = 4 * kGiB + kGiB / 2;     // partition 1 starts past 4 GiB too
constexpr int64_t kTime = 1795741200;                      // 2026-11-27T010000Z

Bytes data_block() { return random_bytes(kBlockSize, 42); }

// A sparse 6 GiB disk: an MBR whose partition 1 spans [4.5 GiB, 6 GiB), and
// one block of data at 5 GiB + 7 blocks.
struct SparseDisk {
  TestRepo t;
  std::string image, part;
  SparseDisk() {
    PointInfo info;
    info.time = kTime;
    info.virtual_size = kDiskSize;
    PointWriter w(t.repo, kVdi, info, "unit test");
    Bytes mbr(kBlockSize);
    auto put32 = [&](size_t at, uint32_t v) { std::memcpy(mbr.data() + at, &v, 4); };
    mbr[446 + 4] = std::byte{0x83};
    put32(446 + 8, static_cast<uint32_t>(kPartStart / 512));
    put32(446 + 12, static_cast<uint32_t>((kDiskSize - kPartStart) / 512));
    mbr[510] = std::byte{0x55};
    mbr[511] = std::byte{0xaa};
    w.put_block(0, mbr);
    w.put_block(kDataAt / kBlockSize, data_block());
    w.commit();
    std::string stem = "/" + kVdi + "/" + format_point_name(kTime);
    image = stem + ".raw";
    part = stem + "-part1.raw";
  }
};

struct Callbacks {
  MountState state;
  CallbackScope scope{state};
  const fuse_operations& ops = fuse_operations_table();
  explicit Callbacks(std::shared_ptr<Repository> repo)
      : state{MountView(std::move(repo)), 0400, getuid(), getgid(), 0, 4096, nullptr} {}

  fuse_file_info open(const std::string& path) {
    fuse_file_info fi{};
    fi.flags = O_RDONLY;
    REQUIRE(ops.open(path.c_str(), &fi) == 0);
    REQUIRE(fi.fh != 0);
    return fi;
  }
};

}  // namespace

TEST_CASE("getattr tells the size and the allocated blocks of an image past 4 GiB") {
  SparseDisk d;
  Callbacks cb(d.t.repo);
  struct stat st {};
  REQUIRE(cb.ops.getattr(d.image.c_str(), &st, nullptr) == 0);
  CHECK(S_ISREG(st.st_mode));
  CHECK((st.st_mode & 0777) == 0400);
  CHECK(static_cast<uint64_t>(st.st_size) == kDiskSize);
  CHECK(static_cast<uint64_t>(st.st_blocks) == 2 * kBlockSize / 512);  // the MBR block and the data block

  REQUIRE(cb.ops.getattr(d.part.c_str(), &st, nullptr) == 0);
  CHECK(static_cast<uint64_t>(st.st_size) == kDiskSize - kPartStart);
  CHECK(static_cast<uint64_t>(st.st_blocks) == kBlockSize / 512);

  // Through an open file the same answer.
  auto fi = cb.open(d.image);
  struct stat st2 {};
  REQUIRE(cb.ops.getattr(nullptr, &st2, &fi) == 0);
  CHECK(st2.st_size == static_cast<off_t>(kDiskSize));
  cb.ops.release(d.image.c_str(), &fi);

  CHECK(cb.ops.getattr(("/" + kVdi + "/nothing.raw").c_str(), &st, nullptr) == -ENOENT);
}

TEST_CASE("read returns the bytes stored past 4 GiB, of the image and of a partition") {
  SparseDisk d;
  Callbacks cb(d.t.repo);
  Bytes want = data_block();
  std::vector<char> buf(3 * kBlockSize);

  auto fi = cb.open(d.image);
  // A read straddling the data block: hole, data, hole.
  off_t at = static_cast<off_t>(kDataAt - kBlockSize);
  REQUIRE(cb.ops.read(d.image.c_str(), buf.data(), buf.size(), at, &fi) == static_cast<int>(buf.size()));
  CHECK(std::all_of(buf.begin(), buf.begin() + kBlockSize, [](char c) { return c == 0; }));
  CHECK(std::memcmp(buf.data() + kBlockSize, want.data(), kBlockSize) == 0);
  CHECK(std::all_of(buf.begin() + 2 * kBlockSize, buf.end(), [](char c) { return c == 0; }));
  // An unaligned read inside the block.
  REQUIRE(cb.ops.read(d.image.c_str(), buf.data(), 100, static_cast<off_t>(kDataAt + 1000), &fi) == 100);
  CHECK(std::memcmp(buf.data(), want.data() + 1000, 100) == 0);
  // Short at the end, nothing past it.
  REQUIRE(cb.ops.read(d.image.c_str(), buf.data(), buf.size(), static_cast<off_t>(kDiskSize - 10), &fi) == 10);
  CHECK(cb.ops.read(d.image.c_str(), buf.data(), buf.size(), static_cast<off_t>(kDiskSize), &fi) == 0);
  cb.ops.release(d.image.c_str(), &fi);

  // The partition is a window: the same bytes at offsets relative to its start.
  auto pi = cb.open(d.part);
  REQUIRE(cb.ops.read(d.part.c_str(), buf.data(), kBlockSize, static_cast<off_t>(kDataAt - kPartStart), &pi) ==
          static_cast<int>(kBlockSize));
  CHECK(std::memcmp(buf.data(), want.data(), kBlockSize) == 0);
  cb.ops.release(d.part.c_str(), &pi);
}

TEST_CASE("lseek finds data and holes at 64-bit offsets") {
  SparseDisk d;
  Callbacks cb(d.t.repo);
  auto fi = cb.open(d.image);
  const char* p = d.image.c_str();
  CHECK(cb.ops.lseek(p, 0, SEEK_DATA, &fi) == 0);  // the MBR
  CHECK(cb.ops.lseek(p, 0, SEEK_HOLE, &fi) == static_cast<off_t>(kBlockSize));
  CHECK(cb.ops.lseek(p, static_cast<off_t>(kBlockSize), SEEK_DATA, &fi) == static_cast<off_t>(kDataAt));
  CHECK(cb.ops.lseek(p, static_cast<off_t>(kDataAt + 5), SEEK_DATA, &fi) == static_cast<off_t>(kDataAt + 5));
  CHECK(cb.ops.lseek(p, static_cast<off_t>(kDataAt), SEEK_HOLE, &fi) == static_cast<off_t>(kDataAt + kBlockSize));
  CHECK(cb.ops.lseek(p, static_cast<off_t>(kDataAt + kBlockSize), SEEK_DATA, &fi) == -ENXIO);
  CHECK(cb.ops.lseek(p, static_cast<off_t>(kDiskSize), SEEK_HOLE, &fi) == -ENXIO);
  CHECK(cb.ops.lseek(p, 0, SEEK_END, &fi) == -EINVAL);
  cb.ops.release(p, &fi);

  auto pi = cb.open(d.part);
  CHECK(cb.ops.lseek(d.part.c_str(), 0, SEEK_DATA, &pi) == static_cast<off_t>(kDataAt - kPartStart));
  CHECK(cb.ops.lseek(d.part.c_str(), 0, SEEK_HOLE, &pi) == 0);
  cb.ops.release(d.part.c_str(), &pi);
}

TEST_CASE("images cannot be opened for writing without an overlay") {
  SparseDisk d;
  Callbacks cb(d.t.repo);
  fuse_file_info fi{};
  fi.flags = O_RDWR;
  CHECK(cb.ops.open(d.image.c_str(), &fi) == -EROFS);
  fi.flags = O_RDONLY;
  CHECK(cb.ops.open(("/" + kVdi).c_str(), &fi) == -EISDIR);
}
