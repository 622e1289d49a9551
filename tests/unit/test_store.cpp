// Format 2: one block store for the whole repository, deduplicated by keyed
// block ids across points, chains and VDIs.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include "../../src/repo/dedup_index.hpp"
#include "cbtfs/errors.hpp"
#include "cbtfs/gc.hpp"
#include "cbtfs/open_storage.hpp"
#include "fault_storage.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/prune.hpp"
#include "cbtfs/verify.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;
namespace fs = std::filesystem;

namespace {

const std::string kVdiB = "1b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a02";
const std::string kVdiC = "2b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a03";
constexpr int64_t kT0 = 1795489200;

// A disk of n blocks of distinct random data, with zero blocks between.
Bytes template_disk(size_t nblocks, uint32_t seed) {
  Bytes d = random_bytes(nblocks * kBlockSize, seed);
  for (size_t b = 5; b < nblocks; b += 7) std::memset(d.data() + b * kBlockSize, 0, kBlockSize);
  return d;
}

void change_blocks(Bytes& d, std::initializer_list<size_t> blocks, uint32_t seed) {
  for (size_t b : blocks) {
    Bytes r = random_bytes(kBlockSize, seed + static_cast<uint32_t>(b));
    std::memcpy(d.data() + b * kBlockSize, r.data(), kBlockSize);
  }
}

uint64_t store_bytes(const TestRepo& t) {
  uint64_t n = 0;
  for (auto& e : fs::recursive_directory_iterator(fs::path(t.root()) / "store" / "packs"))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

// Changes the byte (writing a fixed value would leave it as it was one time
// in 256, and the test would then see no damage).
void flip_byte(std::fstream& f, uint64_t off) {
  f.seekg(static_cast<std::streamoff>(off));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(off));
  f.put(static_cast<char>(c ^ 0x5a));
}

size_t index_segments(const TestRepo& t) {
  size_t n = 0;
  for (auto& e : fs::directory_iterator(fs::path(t.root()) / "store" / "index")) n += e.path().extension() == ".idx";
  return n;
}

std::string vdi_n(int i) {
  char b[40];
  std::snprintf(b, sizeof b, "3b0e7d39-6f1a-4c2e-9a53-2f6d1c1e%04x", i);
  return b;
}

}  // namespace

TEST_CASE("format 2: points read back, and an unchanged block is not written again") {
  TestRepo t(2);
  REQUIRE(t.repo->format() == 2);
  Bytes d = template_disk(300, 1);
  Manifest m1 = t.write(kVdi, d, kT0);
  CHECK(m1.format == 2);
  CHECK(!m1.packs.empty());
  CHECK(fs::exists(fs::path(t.root()) / layout::store_pack_key(m1.packs[0])));
  CHECK(fs::exists(fs::path(t.root()) / layout::store_index_key(m1.packs[0])));
  CHECK(t.read_all(kVdi, 1) == d);

  Bytes d2 = d;
  change_blocks(d2, {3, 100, 299}, 50);
  Manifest m2 = t.write(kVdi, d2, kT0 + 60);
  CHECK(m2.blocks_written == 3);
  CHECK(m2.parent == 1);
  CHECK(t.read_all(kVdi, 2) == d2);
  CHECK(t.read_all(kVdi, 1) == d);  // the parent is untouched
}

TEST_CASE("format 2: a clone in another VDI stores only what it changed") {
  TestRepo t(2);
  Bytes d = template_disk(400, 2);
  Manifest a = t.write(kVdi, d, kT0);
  uint64_t after_template = store_bytes(t);
  Bytes clone = d;
  change_blocks(clone, {0, 1, 222}, 77);
  Manifest b = t.write(kVdiB, clone, kT0);
  CHECK(b.parent == 0);  // a full point of its own VDI...
  CHECK(b.blocks_written == 3);  // ...that writes only its own blocks
  CHECK(store_bytes(t) - after_template < 4 * kBlockSize + 4 * node_size(2));
  CHECK(t.read_all(kVdiB, 1) == clone);
  CHECK(t.read_all(kVdi, 1) == d);
  // An identical clone writes no data block at all.
  Manifest c = t.write(kVdiC, d, kT0);
  CHECK(c.blocks_written == 0);
  CHECK(t.read_all(kVdiC, 1) == d);
  (void)a;
}

TEST_CASE("format 2: a chain break or a resize stores only what differs") {
  TestRepo t(2);
  Bytes d = template_disk(300, 3);
  t.write(kVdi, d, kT0);
  Bytes d2 = d;
  change_blocks(d2, {10, 11}, 9);
  Manifest full = t.write(kVdi, d2, kT0 + 60, /*force_full=*/true);
  CHECK(full.parent == 0);
  CHECK(full.chain == full.seq);
  CHECK(full.blocks_written == 2);
  CHECK(t.read_all(kVdi, full.seq) == d2);

  // Grown by 100 blocks of new data: those, and nothing of the old area.
  Bytes grown = d2;
  Bytes extra = random_bytes(100 * kBlockSize, 1234);
  grown.insert(grown.end(), extra.begin(), extra.end());
  Manifest g = t.write(kVdi, grown, kT0 + 120);
  CHECK(g.parent == 0);
  CHECK(g.chain_reason.find("virtual size changed") != std::string::npos);
  CHECK(g.blocks_written == 100);
  CHECK(t.read_all(kVdi, g.seq) == grown);
}

TEST_CASE("format 2: repeated blocks within one point are stored once") {
  TestRepo t(2);
  Bytes d(200 * kBlockSize);
  Bytes pattern = random_bytes(kBlockSize, 5);
  for (size_t b = 0; b < 200; b += 2) std::memcpy(d.data() + b * kBlockSize, pattern.data(), kBlockSize);
  Manifest m = t.write(kVdi, d, kT0);
  CHECK(m.blocks_written == 1);
  CHECK(t.read_all(kVdi, 1) == d);
}

TEST_CASE("format 2: a damaged dedup index costs a copy, never a wrong block") {
  TestRepo t(2);
  Bytes d = template_disk(300, 4);
  Manifest a = t.write(kVdi, d, kT0);
  // Damage every data page of the index: lookups must miss, not mislead.
  fs::path seg = fs::path(t.root()) / layout::store_index_key(a.packs[0]);
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    auto size = fs::file_size(seg);
    for (uint64_t off = kIndexPageSize + 40; off + kIndexPageSize < size; off += kIndexPageSize)
      flip_byte(f, off);
  }
  t.repo = Repository::open(t.root());  // another process: nothing of the first writer's in memory
  Manifest b = t.write(kVdiB, d, kT0);
  CHECK(b.blocks_written > 200);  // stored again
  CHECK(t.read_all(kVdiB, 1) == d);
  CHECK(verify_vdi(*t.repo, kVdiB).problems.empty());
}

TEST_CASE("format 2: hostile index segments are left out with a warning") {
  TestRepo t(2);
  auto& st = t.repo->storage();
  std::vector<BlockRef> entries;
  for (uint32_t i = 0; i < 200; ++i) {
    BlockRef r{77, 100 + i, 24 + uint64_t{i} * 1000, i, block_id(t.repo->id_key(), random_bytes(64, i))};
    entries.push_back(r);
  }
  Bytes good = encode_index_segment(entries, 77);
  st.put(layout::store_index_key(1), good);
  Bytes truncated(good.begin(), good.begin() + static_cast<ptrdiff_t>(good.size() / 2));
  st.put(layout::store_index_key(2), truncated);
  Bytes bad_count = good;
  bad_count[16] = std::byte{0xff};  // count, under the header's checksum
  st.put(layout::store_index_key(3), bad_count);
  Bytes junk(kIndexPageSize * 3, std::byte{0x41});
  st.put(layout::store_index_key(4), junk);
  DedupIndex idx(st);
  CHECK(idx.segments() == 1);
  CHECK(idx.warnings().size() == 3);
  for (auto& e : entries) {
    auto r = idx.find(e.id);
    REQUIRE(r);
    CHECK(*r == e);
  }
  CHECK(!idx.find(block_id(t.repo->id_key(), random_bytes(64, 9999))));
}

TEST_CASE("format 2: verify finds damage in the store, reads fail with an error") {
  TestRepo t(2);
  Bytes d = template_disk(100, 6);
  Manifest m = t.write(kVdi, d, kT0);
  CHECK(verify_vdi(*t.repo, kVdi).problems.empty());
  fs::path pack = fs::path(t.root()) / layout::store_pack_key(m.packs[0]);
  {
    std::fstream f(pack, std::ios::in | std::ios::out | std::ios::binary);
    flip_byte(f, pack_header_size(2) + 100);
  }
  auto r = verify_vdi(*t.repo, kVdi);
  CHECK(!r.problems.empty());
  auto fresh = Repository::open(t.root());
  PointReader rd(fresh, fresh->latest(kVdi));
  Bytes out(d.size());
  CHECK_THROWS_AS(rd.read(0, out), CorruptError);
}

TEST_CASE("format 2: prune removes points and keeps what the others need") {
  TestRepo t(2);
  Bytes d = template_disk(200, 7);
  std::vector<Bytes> versions;
  for (int i = 0; i < 5; ++i) {
    change_blocks(d, {static_cast<size_t>(10 * i), static_cast<size_t>(10 * i + 1)}, 100 + static_cast<uint32_t>(i));
    t.write(kVdi, d, kT0 + 3600 * i);
    versions.push_back(d);
  }
  RetentionPolicy p;
  p.last = 2;
  auto r = prune_vdi(t.repo, kVdi, p, false, "unit test");
  CHECK(r.removed.size() == 3);
  CHECK(r.store_not_collected);
  uint64_t before = store_bytes(t);
  auto fresh = Repository::open(t.root());
  GcReport dry = collect_store(*fresh, true, "unit test");
  CHECK(store_bytes(t) == before);
  GcReport g = collect_store(*fresh, false, "unit test");
  CHECK(g.bytes_freed == dry.bytes_freed);
  CHECK(g.bytes_freed >= 4 * kBlockSize);  // the blocks only the removed points had (6, less what 4 KiB holes cannot take)
  CHECK(store_bytes(t) == before);  // holes: the files keep their size...
  auto pl = fresh->points(kVdi);
  REQUIRE(pl.points.size() == 2);
  CHECK(t.read_all(kVdi, pl.points[0]->seq) == versions[3]);
  CHECK(t.read_all(kVdi, pl.points[1]->seq) == versions[4]);
  CHECK(verify_vdi(*fresh, kVdi).problems.empty());
  CHECK(collect_store(*fresh, false, "unit test").bytes_freed == 0);  // nothing more to free
  // The index no longer names the freed blocks: writing a removed version
  // again stores it anew instead of referencing a hole.
  Manifest again = t.write(kVdiB, versions[0], kT0);
  CHECK(again.blocks_written >= 6);
  CHECK(t.read_all(kVdiB, again.seq) == versions[0]);
}

namespace {
uint64_t allocated_store_bytes(const TestRepo& t) {
  uint64_t n = 0;
  for (auto& e : fs::recursive_directory_iterator(fs::path(t.root()) / "store" / "packs")) {
    struct stat st;
    if (e.is_regular_file() && ::stat(e.path().c_str(), &st) == 0) n += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return n;
}
}  // namespace

TEST_CASE("format 2 gc: forgetting a VDI frees only what its clones do not share") {
  TestRepo t(2);
  Bytes d = template_disk(300, 11);
  t.write(kVdi, d, kT0);
  Bytes clone = d;
  change_blocks(clone, {1, 2, 3}, 500);
  t.write(kVdiB, clone, kT0);
  Bytes other = template_disk(100, 12);  // nothing in common
  t.write(kVdiC, other, kT0);
  uint64_t before = allocated_store_bytes(t);
  forget_vdi(t.repo, kVdi, "unit test");
  GcReport g = collect_store(*t.repo, false, "unit test");
  CHECK(g.bytes_freed < 8 * kBlockSize);  // the template stays for the clone: only its 3 changed blocks and nodes go
  CHECK(allocated_store_bytes(t) <= before);
  CHECK(t.read_all(kVdiB, 1) == clone);
  CHECK(t.read_all(kVdiC, 1) == other);
  forget_vdi(t.repo, kVdiB, "unit test");
  GcReport g2 = collect_store(*t.repo, false, "unit test");
  CHECK(g2.packs_removed >= 1);  // the template's pack is wholly dead now
  CHECK(g2.bytes_freed > 250 * kBlockSize);
  CHECK(t.read_all(kVdiC, 1) == other);
  CHECK(verify_vdi(*t.repo, kVdiC).problems.empty());
}

TEST_CASE("format 2 gc: a pack a running writer relies on is not freed") {
  TestRepo t(2);
  Bytes d = template_disk(200, 13);
  t.write(kVdi, d, kT0);
  PointInfo info;
  info.time = kT0;
  info.virtual_size = d.size();
  PointWriter w(t.repo, kVdiB, info, "a running backup");
  Bytes block(kBlockSize);
  for (uint64_t b = 0; b < 100; ++b) {  // half of the disk so far: all found in the first VDI's pack
    std::memcpy(block.data(), d.data() + b * kBlockSize, kBlockSize);
    w.put_block(b, block);
  }
  forget_vdi(t.repo, kVdi, "unit test");
  GcReport g = collect_store(*t.repo, false, "unit test");
  CHECK(g.packs_in_use >= 1);
  CHECK(g.bytes_freed < 4 * node_size(2));
  for (uint64_t b = 100; b < w.block_count(); ++b) {
    std::memcpy(block.data(), d.data() + b * kBlockSize, kBlockSize);
    w.put_block(b, block);
  }
  Manifest m = w.commit();
  CHECK(m.blocks_written == 0);
  CHECK(t.read_all(kVdiB, m.seq) == d);
  CHECK(fs::is_empty(fs::path(t.root()) / layout::uses_dir(kVdiB)));
  collect_store(*t.repo, false, "unit test");  // the writer is done: its pack is live through its manifest now
  CHECK(t.read_all(kVdiB, m.seq) == d);
  CHECK(verify_vdi(*t.repo, kVdiB).problems.empty());
}

TEST_CASE("format 2 gc: while a collection frees, writers do not reuse records") {
  TestRepo t(2);
  Bytes d = template_disk(100, 14);
  t.write(kVdi, d, kT0);
  t.repo->storage().put(layout::kGcSweepingKey, {});
  Manifest m = t.write(kVdiB, d, kT0);
  CHECK(m.blocks_written > 80);  // stored anew
  t.repo->storage().remove(layout::kGcSweepingKey);
  Manifest m2 = t.write(kVdiC, d, kT0);
  CHECK(m2.blocks_written == 0);
  CHECK(t.read_all(kVdiB, 1) == d);
}

TEST_CASE("format 2 gc: one at a time, and not on format 1") {
  TestRepo t(2);
  auto held = t.repo->storage().try_lock(layout::kGcLockKey, "another gc");
  REQUIRE(held);
  CHECK_THROWS_AS(collect_store(*t.repo, false, "unit test"), LockedError);
  held.reset();
  CHECK_NOTHROW(collect_store(*t.repo, false, "unit test"));
  TestRepo one;
  CHECK_THROWS_AS(collect_store(*one.repo, false, "unit test"), UsageError);
}

TEST_CASE("format 2 gc: a failure at any storage step loses nothing", "[sweep]") {
  TestRepo t(2);
  Bytes d = template_disk(120, 15);
  std::map<std::string, Bytes> expect;
  t.write(kVdi, d, kT0);
  Bytes clone = d;
  change_blocks(clone, {7, 8, 9, 60}, 600);
  t.write(kVdiB, clone, kT0);
  change_blocks(clone, {20, 21}, 700);
  t.write(kVdiB, clone, kT0 + 60);
  expect[kVdiB] = clone;
  Bytes c = template_disk(40, 16);
  t.write(kVdiC, c, kT0);
  expect[kVdiC] = c;
  forget_vdi(t.repo, kVdi, "unit test");
  RetentionPolicy p;
  p.last = 1;
  prune_vdi(t.repo, kVdiB, p, false, "unit test");

  uint64_t ops;
  {
    TempDir copy;
    fs::copy(t.root(), copy.path / "r", fs::copy_options::recursive);
    auto fs_ = std::make_unique<FaultStorage>(open_local_storage((copy.path / "r").string()), 0, EIO);
    auto* counter = fs_.get();
    auto repo = Repository::open(std::move(fs_));
    uint64_t at_open = counter->operations();
    collect_store(*repo, false, "unit test");
    ops = counter->operations() - at_open;
  }
  REQUIRE(ops > 10);
  for (uint64_t k = 1; k <= ops; ++k) {
    TempDir copy;
    std::string root = (copy.path / "r").string();
    fs::copy(t.root(), root, fs::copy_options::recursive);
    auto faulty = std::make_unique<FaultStorage>(open_local_storage(root), 0, EIO);
    auto* f = faulty.get();
    auto repo = Repository::open(std::move(faulty));
    f->fail_at(f->operations() + k);
    try {
      collect_store(*repo, false, "unit test");
    } catch (const StorageError&) {
    }
    // Whatever it did before the failure, every point reads back, and a
    // collection that runs to the end leaves everything intact too.
    for (int round = 0; round < 2; ++round) {
      auto clean = Repository::open(root);
      for (auto& [vdi, want] : expect) {
        auto m = clean->latest(vdi);
        REQUIRE(m);
        PointReader r(clean, m);
        Bytes out(m->virtual_size);
        r.read(0, out);
        INFO("fault at step " << k << ", round " << round);
        REQUIRE(out == want);
        REQUIRE(verify_vdi(*clean, vdi).problems.empty());
      }
      if (round == 0) collect_store(*clean, false, "unit test");
    }
  }
}

TEST_CASE("a format 1 repository stays format 1") {
  TestRepo t;
  Bytes d = template_disk(50, 8);
  Manifest m = t.write(kVdi, d, kT0);
  CHECK(m.format == 1);
  CHECK(m.pack == 1);
  CHECK(!fs::exists(fs::path(t.root()) / "store"));
  CHECK(t.read_all(kVdi, 1) == d);
}

namespace {
PointInfo info_of(const Bytes& d) {
  PointInfo info;
  info.time = kT0;
  info.virtual_size = d.size();
  return info;
}
void put_range(PointWriter& w, const Bytes& d, uint64_t first, uint64_t end) {
  Bytes block(kBlockSize);
  for (uint64_t b = first; b < end; ++b) {
    std::memcpy(block.data(), d.data() + b * kBlockSize, kBlockSize);
    w.put_block(b, block);
  }
}
}  // namespace

TEST_CASE("format 2: points written at once by one process find each other's blocks before either commits") {
  TestRepo t(2);
  Bytes d = template_disk(300, 21);
  PointWriter a(t.repo, kVdi, info_of(d), "job 1");
  PointWriter b(t.repo, kVdiB, info_of(d), "job 2");
  put_range(a, d, 0, 300);
  put_range(b, d, 0, 300);  // a's last blocks may still be compressing: at most those are stored twice
  Manifest mb = b.commit();  // b first: it makes the pack holding a's records durable itself
  Manifest ma = a.commit();
  CHECK(ma.blocks_written > 200);
  CHECK(mb.blocks_written <= 40);
  CHECK(t.read_all(kVdi, 1) == d);
  CHECK(t.read_all(kVdiB, 1) == d);
  CHECK(verify_vdi(*t.repo, kVdiB).problems.empty());
}

TEST_CASE("format 2: points written at once by two threads store each block once") {
  Bytes d = template_disk(600, 23);
  size_t distinct = 0;
  for (size_t b = 0; b < 600; ++b) distinct += b % 7 != 5;
  for (int round = 0; round < 3; ++round) {
    TestRepo u(2);
    PointWriter a(u.repo, kVdi, info_of(d), "job 1");
    PointWriter b(u.repo, kVdiB, info_of(d), "job 2");
    // Both read the same blocks at the same moment, as two first backups
    // of clones do: whoever meets a block the other is compressing waits
    // for its record instead of storing a second one.
    Manifest ma, mb;
    std::thread ta([&] {
      put_range(a, d, 0, 600);
      ma = a.commit();
    });
    std::thread tb([&] {
      put_range(b, d, 0, 600);
      mb = b.commit();
    });
    ta.join();
    tb.join();
    INFO("round " << round << ": " << ma.blocks_written << " + " << mb.blocks_written);
    CHECK(ma.blocks_written + mb.blocks_written <= distinct + 16);  // 2 s of patience under a loaded sanitizer
    CHECK(u.read_all(kVdi, 1) == d);
    CHECK(u.read_all(kVdiB, 1) == d);
    CHECK(verify_vdi(*u.repo, kVdi).problems.empty());
  }
}

TEST_CASE("format 2: a point that reused the blocks of a writer that failed is still whole") {
  TestRepo t(2);
  Bytes d = template_disk(200, 22);
  Manifest mb;
  {
    PointWriter b(t.repo, kVdiB, info_of(d), "job 2");
    {
      PointWriter a(t.repo, kVdi, info_of(d), "job 1");
      put_range(a, d, 0, 200);
      put_range(b, d, 0, 200);
    }  // a fails: never commits
    mb = b.commit();
  }
  CHECK(mb.blocks_written < 200);
  auto fresh = Repository::open(t.root());
  REQUIRE(!fresh->latest(kVdi));
  PointReader r(fresh, fresh->latest(kVdiB));
  Bytes out(d.size());
  r.read(0, out);
  CHECK(out == d);
  CHECK(verify_vdi(*fresh, kVdiB).problems.empty());
  collect_store(*fresh, false, "unit test");  // a's records no point uses go; b's stay
  CHECK(verify_vdi(*fresh, kVdiB).problems.empty());
  PointReader r2(fresh, fresh->latest(kVdiB));
  r2.read(0, out);
  CHECK(out == d);
}

TEST_CASE("format 2 gc: what a writer looked up before a collection freed it is not reused") {
  for (bool same_process : {false, true}) {
    INFO((same_process ? "found in the process's own records" : "found in the dedup index"));
    TestRepo t(2);
    Bytes d1 = template_disk(60, 30);
    t.write(kVdi, d1, kT0);
    Bytes d2 = d1;
    change_blocks(d2, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 31);
    t.write(kVdi, d2, kT0 + 60);  // point 1 alone has d1's blocks 0-9 now
    // The writer's disk: 50 blocks no one has (their lookups read the
    // index's pages, and miss), then d1's blocks 0-9.
    Bytes mine = random_bytes(60 * kBlockSize, 7777);
    std::memcpy(mine.data() + 50 * kBlockSize, d1.data(), 10 * kBlockSize);
    auto writer_repo = same_process ? t.repo : Repository::open(t.root());
    PointWriter w(writer_repo, kVdiB, info_of(mine), "a long backup");
    put_range(w, mine, 0, 50);
    auto other = Repository::open(t.root());
    RetentionPolicy p;
    p.last = 1;
    prune_vdi(other, kVdi, p, false, "unit test");
    GcReport g = collect_store(*other, false, "unit test");
    REQUIRE(g.bytes_freed > 0);  // d1's blocks 0-9 are gone
    put_range(w, mine, 50, 60);  // seen before the collection, freed by it: stored anew
    Manifest m = w.commit();
    CHECK(m.blocks_written == 59);  // d1's block 5 is a zero block: nothing to store
    auto fresh = Repository::open(t.root());
    PointReader r(fresh, fresh->latest(kVdiB));
    Bytes out(mine.size());
    r.read(0, out);
    CHECK(out == mine);
    CHECK(verify_vdi(*fresh, kVdiB).problems.empty());
  }
}

TEST_CASE("format 2 gc: the index is merged into one segment that lists only live records") {
  TestRepo t(2);
  std::vector<Bytes> disks;
  for (int i = 0; i < 20; ++i) {
    disks.push_back(template_disk(20, 100 + static_cast<uint32_t>(i)));
    t.repo = Repository::open(t.root());  // one process each: one pack, one segment each
    t.write(vdi_n(i), disks.back(), kT0);
  }
  REQUIRE(index_segments(t) == 20);
  for (int i = 0; i < 5; ++i) forget_vdi(t.repo, vdi_n(i), "unit test");
  GcReport g = collect_store(*t.repo, false, "unit test");
  CHECK(g.index_segments == 20);
  CHECK(index_segments(t) == 1);
  CHECK(g.packs_removed == 5);
  size_t data_blocks = 0;
  for (size_t b = 0; b < 20; ++b) data_blocks += b % 7 != 5;
  // What is live is found through the merged segment; what was freed is not.
  t.repo = Repository::open(t.root());
  CHECK(t.write(vdi_n(100), disks[7], kT0).blocks_written == 0);
  t.repo = Repository::open(t.root());
  CHECK(t.write(vdi_n(101), disks[2], kT0).blocks_written == data_blocks);
  CHECK(t.read_all(vdi_n(101), 1) == disks[2]);
  for (int i = 5; i < 20; ++i) {
    CHECK(t.read_all(vdi_n(i), 1) == disks[static_cast<size_t>(i)]);
    CHECK(verify_vdi(*t.repo, vdi_n(i)).problems.empty());
  }
  // Nothing dead and few segments: left as they are.
  GcReport g2 = collect_store(*t.repo, false, "unit test");
  CHECK(g2.bytes_freed == 0);
  CHECK(index_segments(t) == 2);
}

TEST_CASE("format 2 gc: a damaged index segment is listed again from what the points reference") {
  TestRepo t(2);
  Bytes d = template_disk(100, 31);
  Manifest a = t.write(kVdi, d, kT0);
  fs::path seg = fs::path(t.root()) / layout::store_index_key(a.packs[0]);
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    flip_byte(f, kIndexPageSize + 100);
  }
  collect_store(*t.repo, false, "unit test");
  CHECK(!fs::exists(seg));
  CHECK(index_segments(t) == 1);
  t.repo = Repository::open(t.root());
  CHECK(t.write(kVdiB, d, kT0).blocks_written == 0);
  CHECK(t.read_all(kVdiB, 1) == d);
}

TEST_CASE("format 2: writers merge their index segments once there are many, and lookups still find every record") {
  TestRepo t(2);
  std::vector<Bytes> disks;
  for (int i = 0; i < 40; ++i) {
    disks.push_back(template_disk(8, 200 + static_cast<uint32_t>(i)));
    t.repo = Repository::open(t.root());
    t.write(vdi_n(i), disks.back(), kT0);
  }
  REQUIRE(index_segments(t) == 40);
  CHECK(merge_index_segments(*t.repo, "unit test") == 40);
  CHECK(index_segments(t) == 1);
  CHECK(merge_index_segments(*t.repo, "unit test") == 0);  // few left: nothing to do
  for (int i : {0, 17, 39}) {
    t.repo = Repository::open(t.root());
    CHECK(t.write(vdi_n(100 + i), disks[static_cast<size_t>(i)], kT0).blocks_written == 0);
  }
  // Not while a collection holds the store.
  for (int i = 40; i < 75; ++i) {
    t.repo = Repository::open(t.root());
    t.write(vdi_n(i), template_disk(8, 200 + static_cast<uint32_t>(i)), kT0);
  }
  {
    auto held = t.repo->storage().try_lock(layout::kGcLockKey, "a collection");
    REQUIRE(held);
    CHECK(merge_index_segments(*t.repo, "unit test") == 0);
  }
  CHECK(merge_index_segments(*t.repo, "unit test") == 35);
  forget_vdi(t.repo, vdi_n(3), "unit test");
  collect_store(*t.repo, false, "unit test");
  CHECK(index_segments(t) == 1);
  for (int i : {0, 17, 39, 60}) CHECK(verify_vdi(*t.repo, vdi_n(i)).problems.empty());
}

namespace {
// A repository over a storage that frees no ranges of objects, as S3.
std::shared_ptr<Repository> open_keeping_ranges(const std::string& root) {
  auto st = std::make_unique<FaultStorage>(open_local_storage(root), 0, EIO);
  st->keep_ranges();
  return Repository::open(std::move(st));
}

std::set<std::string> pack_files(const TestRepo& t) {
  std::set<std::string> names;
  for (auto& e : fs::recursive_directory_iterator(fs::path(t.root()) / "store" / "packs"))
    if (e.is_regular_file()) names.insert(e.path().filename().string());
  return names;
}

// `points` points of a disk of `blocks`, each rewriting its first 30 %:
// once all but the last are pruned, the first point's pack is about a
// third dead and the others' wholly.
std::vector<Bytes> write_rewritten_versions(TestRepo& t, const std::string& vdi, uint32_t seed, size_t blocks,
                                            uint32_t points) {
  Bytes d = template_disk(blocks, seed);
  std::vector<Bytes> versions;
  for (uint32_t i = 0; i < points; ++i) {
    for (size_t b = 0; b < blocks * 3 / 10; ++b) change_blocks(d, {b}, seed * 1000 + i * 100);
    t.write(vdi, d, kT0 + 3600 * i);
    versions.push_back(d);
  }
  return versions;
}
}  // namespace

TEST_CASE("format 2 gc on an object store: a partly dead pack is rewritten, and readers follow it") {
  TestRepo t(2);
  auto versions = write_rewritten_versions(t, kVdi, 41, 200, 6);
  uint64_t first_id = t.repo->points(kVdi).points[0]->packs[0];
  std::string first_pack = layout::store_pack_key(first_id);
  first_pack = first_pack.substr(first_pack.rfind('/') + 1);
  // A reader that stays open across the rewrites, as a mount does.
  auto reader = open_keeping_ranges(t.root());
  auto last_point = [&](std::shared_ptr<Repository> r) {
    auto m = r->latest(kVdi);
    PointReader pr(r, m);
    Bytes out(m->virtual_size);
    pr.read(0, out);
    return out;
  };
  REQUIRE(last_point(reader) == versions.back());

  RetentionPolicy p;
  p.last = 1;
  prune_vdi(t.repo, kVdi, p, false, "unit test");
  uint64_t before = store_bytes(t);
  auto repo = open_keeping_ranges(t.root());
  GcReport dry = collect_store(*repo, true, "unit test");
  CHECK(store_bytes(t) == before);
  GcReport g = collect_store(*repo, false, "unit test");
  CHECK(g.packs_rewritten == 1);
  CHECK(g.bytes_rewritten > 100 * kBlockSize / 2);  // the 140 live blocks, compressed a little at most
  CHECK(g.packs_removed == 4);  // points 2 to 5 wrote only what the next one rewrote
  CHECK(g.bytes_freed == dry.bytes_freed);
  CHECK(g.bytes_dead == 0);
  CHECK(store_bytes(t) == before - g.bytes_freed);  // given back, not only counted
  auto files = pack_files(t);
  std::string gen1 = first_pack.substr(0, 16) + "-1.pack";
  CHECK(files.count(gen1) == 1);
  CHECK(files.count(first_pack) == 0);
  CHECK(last_point(reader) == versions.back());
  CHECK(last_point(Repository::open(t.root())) == versions.back());
  CHECK(verify_vdi(*Repository::open(t.root()), kVdi).problems.empty());
  CHECK(collect_store(*repo, false, "unit test").packs_rewritten == 0);  // nothing more worth it

  // More of it dies: the rewrite is rewritten, again from the offsets the
  // references hold, and the reader that knew generation 1 finds 2.
  Bytes d = versions.back();
  for (uint32_t i = 0; i < 2; ++i) {
    for (size_t b = 100; b < 160; ++b) change_blocks(d, {b}, 9000 + i * 100);
    t.write(kVdi, d, kT0 + 86400 + 3600 * i);
  }
  prune_vdi(t.repo, kVdi, p, false, "unit test");
  GcReport again = collect_store(*repo, false, "unit test");
  CHECK(again.packs_rewritten >= 1);
  files = pack_files(t);
  CHECK(files.count(first_pack.substr(0, 16) + "-2.pack") == 1);
  CHECK(files.count(gen1) == 0);
  CHECK(last_point(reader) == d);
  CHECK(verify_vdi(*Repository::open(t.root()), kVdi).problems.empty());
  // A damaged record table is an error, never data.
  {
    std::fstream f(fs::path(t.root()) / layout::store_pack_dir(first_id) / (first_pack.substr(0, 16) + "-2.pack"),
                   std::ios::in | std::ios::out | std::ios::binary);
    REQUIRE(f);
    flip_byte(f, 40);
  }
  auto fresh = Repository::open(t.root());
  CHECK_THROWS_AS(last_point(fresh), CorruptError);
  CHECK_FALSE(verify_vdi(*fresh, kVdi).problems.empty());
}

TEST_CASE("format 2 gc on an object store: a failure at any step of a rewrite loses nothing", "[sweep]") {
  TestRepo t(2);
  auto versions = write_rewritten_versions(t, kVdi, 43, 40, 3);
  Bytes other = template_disk(30, 44);
  t.write(kVdiB, other, kT0);
  RetentionPolicy p;
  p.last = 1;
  prune_vdi(t.repo, kVdi, p, false, "unit test");
  uint64_t ops;
  {
    TempDir copy;
    fs::copy(t.root(), copy.path / "r", fs::copy_options::recursive);
    auto fs_ = std::make_unique<FaultStorage>(open_local_storage((copy.path / "r").string()), 0, EIO);
    fs_->keep_ranges();
    auto* counter = fs_.get();
    auto repo = Repository::open(std::move(fs_));
    uint64_t at_open = counter->operations();
    REQUIRE(collect_store(*repo, false, "unit test").packs_rewritten == 1);
    ops = counter->operations() - at_open;
  }
  REQUIRE(ops > 10);
  for (uint64_t k = 1; k <= ops; ++k) {
    TempDir copy;
    std::string root = (copy.path / "r").string();
    fs::copy(t.root(), root, fs::copy_options::recursive);
    auto faulty = std::make_unique<FaultStorage>(open_local_storage(root), 0, EIO);
    faulty->keep_ranges();
    auto* f = faulty.get();
    auto repo = Repository::open(std::move(faulty));
    f->fail_at(f->operations() + k);
    try {
      collect_store(*repo, false, "unit test");
    } catch (const StorageError&) {
    }
    for (int round = 0; round < 2; ++round) {
      auto clean = open_keeping_ranges(root);
      INFO("fault at step " << k << ", round " << round);
      for (auto& [vdi, want] : std::map<std::string, Bytes>{{kVdi, versions.back()}, {kVdiB, other}}) {
        auto m = clean->latest(vdi);
        REQUIRE(m);
        PointReader r(clean, m);
        Bytes out(m->virtual_size);
        r.read(0, out);
        REQUIRE(out == want);
        REQUIRE(verify_vdi(*clean, vdi).problems.empty());
      }
      if (round == 0) collect_store(*clean, false, "unit test");
    }
    // After a collection that ran to the end, one file per pack is left.
    std::set<std::string> ids;
    size_t n = 0;
    for (auto& e : fs::recursive_directory_iterator(fs::path(root) / "store" / "packs"))
      if (e.is_regular_file()) {
        ++n;
        ids.insert(e.path().filename().string().substr(0, 16));
      }
    CHECK(n == ids.size());
  }
}

TEST_CASE("format 2 gc with requests side by side does what it does one at a time") {
  // Several VDIs of clones, most of their points pruned: the marking, the
  // index, the judging and the rewrites all have work for many threads.
  auto build = [](TestRepo& t) {
    std::map<std::string, Bytes> last;
    Bytes base = template_disk(60, 51);
    for (int v = 0; v < 6; ++v) {
      Bytes d = base;
      for (uint32_t k = 0; k < 4; ++k) {
        for (size_t b = 0; b < 20; ++b) change_blocks(d, {b + static_cast<size_t>(v)}, 5000 + 100 * v + 10 * k);
        t.write(vdi_n(v), d, kT0 + 3600 * k);
      }
      last[vdi_n(v)] = d;
      RetentionPolicy p;
      p.last = 1;
      prune_vdi(t.repo, vdi_n(v), p, false, "unit test");
    }
    return last;
  };
  TestRepo one(2), many(2);
  auto want = build(one);
  REQUIRE(build(many) == want);
  auto collect = [](TestRepo& t, unsigned threads) {
    auto st = std::make_unique<FaultStorage>(open_local_storage(t.root()), 0, EIO);
    st->keep_ranges();
    st->set_parallelism(threads);
    return collect_store(*Repository::open(std::move(st)), false, "unit test");
  };
  GcReport a = collect(one, 1), b = collect(many, 8);
  CHECK(b.packs_rewritten > 0);
  // Pack ids are random, so index nodes (which hold them) compress to a few
  // bytes more or less from one repository to the other.
  CHECK(a.packs == b.packs);
  CHECK(a.packs_removed == b.packs_removed);
  CHECK(a.packs_rewritten == b.packs_rewritten);
  CHECK(a.live_records == b.live_records);
  CHECK(a.index_entries == b.index_entries);
  auto near = [](uint64_t x, uint64_t y) { return std::max(x, y) - std::min(x, y) <= 4096; };
  CHECK(near(a.bytes_freed, b.bytes_freed));
  CHECK(near(store_bytes(one), store_bytes(many)));
  for (auto& [vdi, d] : want) {
    auto r = Repository::open(many.root());
    CHECK(many.read_all(vdi, r->latest(vdi)->seq) == d);
    CHECK(verify_vdi(*r, vdi).problems.empty());
  }
}

TEST_CASE("format 2: a run of incompressible blocks is stored without trying LZ4, until the data compresses again") {
  TestRepo t(2);
  constexpr size_t kRandom = 64, kText = 128;
  Bytes d = random_bytes(kRandom * kBlockSize, 31);
  Bytes text = text_bytes(kText * kBlockSize, 32);
  d.insert(d.end(), text.begin(), text.end());
  t.write(kVdi, d, kT0);
  CHECK(t.read_all(kVdi, 1) == d);
  // Every random block is stored raw; once the text starts, a probe finds
  // that it compresses, and at least half the text blocks are compressed
  // (a quarter of a block each or less).
  CHECK(store_bytes(t) < (kRandom + kText / 2) * kBlockSize + kText / 2 * kBlockSize / 4 + (1 << 20));

  TestRepo u(2);
  u.write(kVdi, text, kT0);
  CHECK(u.read_all(kVdi, 1) == text);
  CHECK(store_bytes(u) < kText * kBlockSize / 4 + (1 << 20));  // compressible from the start: every block
}
