// Points written and read back through the real local storage.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>

#include "cbtfs/errors.hpp"
#include "cbtfs/open_storage.hpp"
#include "mount/mount_view.hpp"
#include "cbtfs/verify.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;
namespace fs = std::filesystem;

namespace {

// A disk of mixed blocks: random, text, zero.
Bytes mixed_disk(size_t nblocks, size_t tail, uint32_t seed) {
  Bytes d(nblocks * kBlockSize + tail);
  for (size_t b = 0; b * kBlockSize < d.size(); ++b) {
    size_t len = std::min<size_t>(kBlockSize, d.size() - b * kBlockSize);
    Bytes src = b % 3 == 0 ? random_bytes(kBlockSize, seed + static_cast<uint32_t>(b))
                : b % 3 == 1 ? text_bytes(kBlockSize, static_cast<uint32_t>(b)) : Bytes(kBlockSize);
    std::memcpy(d.data() + b * kBlockSize, src.data(), len);
  }
  return d;
}

void flip_byte(const fs::path& p, uint64_t off) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(off));
  char c;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(off));
  f.put(static_cast<char>(c ^ 0x5a));
}

}  // namespace

TEST_CASE("a full base and deltas read back exactly, deltas store only changed blocks") {
  TestRepo t;
  Bytes d1 = mixed_disk(40, 12345, 1);  // size not a multiple of 64 KiB
  Manifest m1 = t.write(kVdi, d1, 1000);
  CHECK(m1.parent == 0);
  CHECK(m1.chain == 1);
  CHECK(m1.blocks_written == 28);  // 14 zero blocks cost nothing (the tail block is random)

  Bytes d2 = d1;
  d2[5 * kBlockSize + 17] ^= std::byte{1};             // one byte of one block
  std::memset(d2.data() + 9 * kBlockSize, 0, kBlockSize);  // a block zeroed
  d2[d2.size() - 1] ^= std::byte{0xff};                 // the last, partial block
  Manifest m2 = t.write(kVdi, d2, 2000);
  CHECK(m2.parent == 1);
  CHECK(m2.chain == 1);
  CHECK(m2.blocks_written == 2);

  Bytes d3 = d2;  // identical: a point with no pack at all
  Manifest m3 = t.write(kVdi, d3, 3000);
  CHECK(m3.blocks_written == 0);
  CHECK(m3.pack == 0);
  CHECK(m3.root == m2.root);

  CHECK(t.read_all(kVdi, 1) == d1);
  CHECK(t.read_all(kVdi, 2) == d2);
  CHECK(t.read_all(kVdi, 3) == d3);
  auto r = verify_vdi(*t.repo, kVdi);
  CHECK(r.problems.empty());
  CHECK(r.points == 3);
}

TEST_CASE("unaligned reads across block boundaries and the end of the disk") {
  TestRepo t;
  Bytes d = mixed_disk(5, 1000, 7);
  t.write(kVdi, d, 1);
  auto m = t.repo->latest(kVdi);
  PointReader r(t.repo, m);
  for (uint64_t off : {uint64_t{0}, uint64_t{1}, uint64_t{kBlockSize - 3}, uint64_t{3 * kBlockSize + 5}, uint64_t{d.size() - 10}}) {
    for (size_t len : {size_t{1}, size_t{4096}, size_t{kBlockSize + 7}, size_t{3 * kBlockSize}}) {
      Bytes out(len);
      size_t n = r.read(off, out);
      size_t expect = std::min<size_t>(len, d.size() - off);
      REQUIRE(n == expect);
      CHECK(std::memcmp(out.data(), d.data() + off, n) == 0);
    }
  }
  Bytes out(10);
  CHECK(r.read(d.size(), out) == 0);
}

TEST_CASE("block lookup does not depend on chain length") {
  TestRepo t;
  Bytes d = mixed_disk(3000, 0, 3);  // depth 2
  t.write(kVdi, d, 1);
  for (int i = 2; i <= 60; ++i) {
    size_t b = static_cast<size_t>(i * 37 % 3000);
    d[b * kBlockSize] ^= std::byte{1};
    PointInfo info;
    info.time = i;
    info.virtual_size = d.size();
    PointWriter w(t.repo, kVdi, info, "t");
    w.put_block(b, {d.data() + b * kBlockSize, kBlockSize});  // only the changed block, as CBT does
    w.commit();
  }
  auto m = t.repo->latest(kVdi);
  CHECK(m->seq == 60);
  CHECK(m->depth == 2);
  CHECK(t.read_all(kVdi, 60) == d);
  // Unchanged blocks still resolve to the base's pack in one tree walk.
  PointReader r(t.repo, m);
  CHECK(r.lookup(1).pack == 1);
  CHECK(r.lookup((60 * 37) % 3000).pack == 60);
}

TEST_CASE("zero blocks and zero subtrees cost nothing; seek finds data and holes") {
  TestRepo t;
  Bytes d(5000 * kBlockSize);  // 2 levels; data only in block 10 and 3000
  d[10 * kBlockSize] = std::byte{1};
  d[3000 * kBlockSize + 5] = std::byte{2};
  Manifest m = t.write(kVdi, d, 1);
  CHECK(m.blocks_written == 2);
  CHECK(m.bytes_stored < 4 * node_size(1));
  PointReader r(t.repo, t.repo->latest(kVdi));
  CHECK(r.next_data(0) == 10 * kBlockSize);
  CHECK(r.next_data(10 * kBlockSize + 3) == 10 * kBlockSize + 3);
  CHECK(r.next_hole(10 * kBlockSize) == 11 * kBlockSize);
  CHECK(r.next_data(11 * kBlockSize) == 3000 * kBlockSize);
  CHECK(r.next_data(3001 * kBlockSize) == d.size());
  CHECK(r.next_hole(0) == 0);
}

TEST_CASE("put_zeros clears what the parent had and skips what it did not") {
  TestRepo t;
  Bytes d = mixed_disk(3000, 0, 11);
  t.write(kVdi, d, 1);
  PointInfo info;
  info.time = 2;
  info.virtual_size = d.size();
  PointWriter w(t.repo, kVdi, info, "t");
  w.put_block(0, {d.data(), kBlockSize});
  w.put_zeros(1, 1500);
  w.put_block(1500, {d.data() + 1500 * kBlockSize, kBlockSize});
  w.put_zeros(2000, 99999);  // clamped to the disk
  Manifest m = w.commit();
  std::memset(d.data() + kBlockSize, 0, 1499 * kBlockSize);
  std::memset(d.data() + 2000 * kBlockSize, 0, 1000 * kBlockSize);
  CHECK(t.read_all(kVdi, 2) == d);
  CHECK(m.blocks_written == 0);
}

TEST_CASE("a new size starts a new chain") {
  TestRepo t;
  t.write(kVdi, mixed_disk(4, 0, 1), 1);
  Manifest m = t.write(kVdi, mixed_disk(6, 0, 1), 2);
  CHECK(m.parent == 0);
  CHECK(m.chain == 2);
  CHECK(m.chain_reason.find("virtual size changed") != std::string::npos);
}

TEST_CASE("point times must increase") {
  TestRepo t;
  t.write(kVdi, mixed_disk(2, 0, 1), 100);
  CHECK_THROWS_AS(t.write(kVdi, mixed_disk(2, 0, 1), 100), UsageError);
  CHECK_THROWS_AS(t.write(kVdi, mixed_disk(2, 0, 1), 50), UsageError);
}

TEST_CASE("one writer per VDI; the lock frees when the writer goes") {
  TestRepo t;
  PointInfo info;
  info.time = 1;
  info.virtual_size = kBlockSize;
  {
    PointWriter w(t.repo, kVdi, info, "first writer");
    try {
      PointWriter w2(t.repo, kVdi, info, "second");
      FAIL("two writers");
    } catch (const LockedError& e) {
      CHECK(std::string(e.what()).find("first writer") != std::string::npos);
    }
  }
  CHECK_NOTHROW(PointWriter(t.repo, kVdi, info, "third"));
}

TEST_CASE("an uncommitted point is invisible, and its leftovers are cleaned by the next writer") {
  TestRepo t;
  Bytes d = mixed_disk(8, 0, 9);
  t.write(kVdi, d, 1);
  {
    PointInfo info;
    info.time = 2;
    info.virtual_size = d.size();
    PointWriter w(t.repo, kVdi, info, "t");
    w.put_block(0, random_bytes(kBlockSize, 77));
  }  // dropped without commit
  CHECK(t.repo->points(kVdi).points.size() == 1);
  // A crash between pack and manifest leaves an orphan pack; simulate it.
  fs::path packs = fs::path(t.root()) / "vdis" / kVdi / "packs";
  fs::copy_file(packs / "00000001.pack", packs / "00000002.pack");
  std::ofstream(packs / ".tmp.00000003.pack.1.2") << "junk";
  CHECK(!verify_vdi(*t.repo, kVdi).warnings.empty());
  t.write(kVdi, d, 3);
  CHECK(fs::exists(packs / "00000002.pack") == false);  // the new point had nothing to store
  CHECK(fs::exists(packs / ".tmp.00000003.pack.1.2") == false);
  CHECK(t.repo->latest(kVdi)->seq == 3);  // the orphan's number is not used again
  CHECK(t.read_all(kVdi, 3) == d);
}

TEST_CASE("a flipped byte in a pack gives CorruptError for that block only, and verify names it") {
  TestRepo t;
  Bytes d = mixed_disk(12, 0, 5);
  t.write(kVdi, d, 1);
  fs::path pack = fs::path(t.root()) / "vdis" / kVdi / "packs" / "00000001.pack";
  flip_byte(pack, pack_header_size(1) + 100);  // inside the first record: block 0
  auto repo = Repository::open(t.root());  // fresh caches
  PointReader r(repo, repo->latest(kVdi));
  Bytes out(kBlockSize);
  CHECK_THROWS_AS(r.read(0, out), CorruptError);
  CHECK_THROWS_AS(r.read(100, {out.data(), 10}), CorruptError);
  for (size_t b = 1; b < 12; ++b) {
    REQUIRE_NOTHROW(r.read(b * kBlockSize, out));
    CHECK(std::memcmp(out.data(), d.data() + b * kBlockSize, kBlockSize) == 0);
  }
  auto rep = verify_vdi(*repo, kVdi);
  REQUIRE(rep.problems.size() == 1);
  CHECK(rep.problems[0].find("block 0") != std::string::npos);
  CHECK(rep.problems[0].find("seq 1") != std::string::npos);
}

TEST_CASE("a truncated pack or a damaged manifest is reported, not fatal for others") {
  TestRepo t;
  Bytes d = mixed_disk(6, 0, 5);
  t.write(kVdi, d, 1);
  d[0] ^= std::byte{1};
  t.write(kVdi, d, 2);
  fs::path base = fs::path(t.root()) / "vdis" / kVdi;
  fs::resize_file(base / "packs" / "00000002.pack", 40);
  flip_byte(base / "points" / "00000001.point", 30);
  auto repo = Repository::open(t.root());
  auto pl = repo->points(kVdi);
  CHECK(pl.points.size() == 1);
  CHECK(pl.errors.size() == 1);
  auto rep = verify_vdi(*repo, kVdi);
  CHECK(rep.problems.size() >= 2);
  PointReader r(repo, pl.points[0]);
  Bytes out(kBlockSize);
  CHECK_THROWS_AS(r.read(0, out), CorruptError);
}

TEST_CASE("storage: objects appear only on commit and are never overwritten") {
  TempDir d;
  auto st = open_local_storage(d.str());
  {
    auto w = st->create("a/b/obj");
    Bytes x = random_bytes(100, 1);
    w->append(x);
    CHECK(!st->size("a/b/obj"));
    CHECK(st->list("a/b").empty());
    w->commit();
  }
  CHECK(st->size("a/b/obj") == 100u);
  CHECK_THROWS_AS(st->put("a/b/obj", random_bytes(5, 1)), StorageError);
  CHECK(st->get("a/b/obj")->size() == 100);
  { auto w = st->create("a/b/other"); }
  CHECK(st->list("a/b") == std::vector<std::string>{"obj"});
  Bytes out(10);
  CHECK_THROWS_AS(st->read("a/b/obj", 95, out), FormatError);  // truncated
  st->remove("a/b/obj");
  CHECK(!st->get("a/b/obj"));
}

TEST_CASE("repository open: missing, foreign and newer repositories are refused clearly") {
  TempDir d;
  CHECK_THROWS_AS(Repository::open(d.str() + "/nope"), StorageError);
  CHECK_THROWS_AS(Repository::open(d.str()), UsageError);
  Repository::init(d.str() + "/r");
  CHECK_THROWS_AS(Repository::init(d.str() + "/r"), UsageError);
  CHECK((fs::status(d.path / "r").permissions() & fs::perms::all) == fs::perms::owner_all);
  std::ofstream(d.path / "r" / "cbtfs-repository") << "garbage";
  CHECK_THROWS_AS(Repository::open(d.str() + "/r"), FormatError);
}

TEST_CASE("names in the mount view cannot escape their directory") {
  CHECK(sanitize_name("web/1") == "web_1");
  CHECK(sanitize_name("..") == "_..");
  CHECK(sanitize_name(".") == "_.");
  CHECK(sanitize_name("") == "_");
  CHECK(sanitize_name("a\nb") == "a_b");
  CHECK(sanitize_name("\xff\xfe ok") == "__ ok");
  CHECK(sanitize_name("caf\xc3\xa9") == "caf\xc3\xa9");
  CHECK(sanitize_name(std::string(500, 'x')).size() == 200);
  CHECK(sanitize_name(std::string(300, 'x') + "/").size() == 200);
  CHECK(sanitize_name(std::string(300, '/')).size() == 200);
  CHECK(sanitize_name(std::string(300, '\xff')).size() == 200);
}

TEST_CASE("the mount view lists points, latest and by-name") {
  TestRepo t;
  Bytes d = mixed_disk(2, 0, 1);
  PointInfo info;
  for (int i = 1; i <= 2; ++i) {
    info.time = 1795489200 + i * 86400;
    info.virtual_size = d.size();
    info.vm_name = "../vm";
    info.vdi_name = "disk/0";
    PointWriter w(t.repo, kVdi, info, "t");
    w.commit();
  }
  const std::string other = "1b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01";
  PointWriter w(t.repo, other, info, "t");
  w.commit();
  MountView v(t.repo);
  auto root = v.list("/");
  REQUIRE(root);
  CHECK(root->size() == 3);
  auto dir = v.list("/" + kVdi);
  REQUIRE(dir);
  REQUIRE(dir->size() == 3);
  CHECK((*dir)[0].first == "2026-11-25T030000Z.raw");
  CHECK((*dir)[2].first == "latest.raw");
  CHECK((*dir)[2].second.target == "2026-11-26T030000Z.raw");
  auto vms = v.list("/by-name");
  REQUIRE(vms);
  REQUIRE(vms->size() == 1);
  CHECK((*vms)[0].first == ".._vm");
  auto disks = v.list("/by-name/.._vm");
  REQUIRE(disks);
  REQUIRE(disks->size() == 2);
  CHECK((*disks)[0].first == "disk_0");
  CHECK((*disks)[1].first == "disk_0 (1b0e7d39)");
  CHECK((*disks)[1].second.target == "../../" + other);
  CHECK(v.lookup("/" + kVdi + "/latest.raw")->kind == ViewEntry::Kind::Link);
  CHECK(v.lookup("/" + kVdi + "/latest.raw")->target == "2026-11-26T030000Z.raw");
  // A lookup finds exactly what the listing shows.
  for (auto& [name, e] : *dir) {
    auto found = v.lookup("/" + kVdi + "/" + name);
    REQUIRE(found);
    CHECK(found->kind == e.kind);
    CHECK(found->mtime == e.mtime);
    CHECK(found->point == e.point);
    CHECK(found->size == e.size);
    CHECK(found->target == e.target);
  }
  CHECK(!v.lookup("/" + kVdi + "/2026-11-25T030000Z-part1.raw"));  // no partition table
  CHECK(!v.lookup("/" + kVdi + "/2026-11-25T030000Z.raw.raw"));
  CHECK(!v.lookup("/" + kVdi + "/nope.raw"));
  CHECK(!v.lookup("/nope"));
  CHECK(!v.lookup("/" + kVdi + "/latest.raw/x"));
}

TEST_CASE("symbolic links inside the repository are refused, never followed") {
  TestRepo t;
  Bytes d = mixed_disk(4, 0, 3);
  t.write(kVdi, d, 1000);
  fs::path vdi_dir = fs::path(t.root()) / "vdis" / kVdi;
  fs::path elsewhere = t.dir.path / "elsewhere";
  auto links_refused = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const StorageError& e) {
      CHECK(std::string(e.what()).find("symbolic link") != std::string::npos);
      return true;
    }
    return false;
  };

  SECTION("a swapped directory of packs") {
    fs::rename(vdi_dir / "packs", elsewhere);
    fs::create_directory_symlink(elsewhere, vdi_dir / "packs");
    auto repo = Repository::open(t.root());
    CHECK(links_refused([&] {
      PointReader r(repo, repo->latest(kVdi));
      Bytes out(kBlockSize);
      r.read(0, out);
    }));
    CHECK(links_refused([&] { verify_vdi(*repo, kVdi); }));
    CHECK(links_refused([&] { t.write(kVdi, d, 2000); }));
  }
  SECTION("a manifest that is a link to a file outside") {
    fs::copy_file(vdi_dir / "points" / "00000001.point", elsewhere);
    fs::remove(vdi_dir / "points" / "00000001.point");
    fs::create_symlink(elsewhere, vdi_dir / "points" / "00000001.point");
    auto repo = Repository::open(t.root());
    CHECK(links_refused([&] { repo->points(kVdi); }));
  }
  SECTION("the VDI directory itself") {
    fs::rename(vdi_dir, elsewhere);
    fs::create_directory_symlink(elsewhere, vdi_dir);
    auto repo = Repository::open(t.root());
    CHECK(links_refused([&] { repo->points(kVdi); }));
    CHECK(links_refused([&] { t.write(kVdi, d, 2000); }));
    CHECK(fs::exists(elsewhere / "points" / "00000001.point"));  // nothing was written or removed there
    CHECK(fs::directory_iterator(elsewhere / "packs")->path().filename() == "00000001.pack");
  }
}

namespace {

uint64_t le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | static_cast<uint8_t>(p[i]);
  return v;
}
void put_le64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

// Two different 64 KiB blocks with the same XXH3-64, as a guest could write
// them. XXH3's long-input loop adds each 8-byte lane to one accumulator and
// lo32(lane ^ secret) * hi32(lane ^ secret) to its neighbour; a lane whose
// low half equals the secret's adds no product, so moving 2^32 from lane 0
// of the first stripe to lane 0 of the second (secret bytes 0-7 and 8-15)
// leaves every accumulator, and so the hash, as it was.
std::pair<Bytes, Bytes> xxh3_collision() {
  static const uint8_t kSecret[16] = {0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe,
                                      0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c};  // XXH3_kSecret
  Bytes a = random_bytes(kBlockSize, 77);
  auto s0 = le64(reinterpret_cast<const std::byte*>(kSecret)), s1 = le64(reinterpret_cast<const std::byte*>(kSecret + 8));
  put_le64(a.data(), (uint64_t{0x1234} << 32) | (s0 & 0xffffffff));
  put_le64(a.data() + 64, (uint64_t{0x5678} << 32) | (s1 & 0xffffffff));
  Bytes b = a;
  put_le64(b.data(), le64(a.data()) + (uint64_t{1} << 32));
  put_le64(b.data() + 64, le64(a.data() + 64) - (uint64_t{1} << 32));
  return {a, b};
}

}  // namespace

TEST_CASE("a block whose XXH3-64 equals the parent's but whose bytes differ is stored") {
  auto [a, b] = xxh3_collision();
  REQUIRE(a != b);
  REQUIRE(hash_bytes(a) == hash_bytes(b));  // a real collision, no seam

  TestRepo t;
  Bytes d1 = mixed_disk(8, 0, 3);
  std::memcpy(d1.data() + 2 * kBlockSize, a.data(), kBlockSize);
  t.write(kVdi, d1, 1000);
  Bytes d2 = d1;
  std::memcpy(d2.data() + 2 * kBlockSize, b.data(), kBlockSize);
  Manifest m2 = t.write(kVdi, d2, 2000);
  CHECK(m2.blocks_written == 1);
  CHECK(t.read_all(kVdi, 2) == d2);  // the guest's bytes, not the parent's
  CHECK(t.read_all(kVdi, 1) == d1);
  // A block that is really unchanged is still not stored again.
  Manifest m3 = t.write(kVdi, d2, 3000);
  CHECK(m3.blocks_written == 0);
}
