// Format 2: one block store for the whole repository, deduplicated by keyed
// block ids across points, chains and VDIs.
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "../../src/repo/dedup_index.hpp"
#include "cbtfs/errors.hpp"
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
    for (uint64_t off = kIndexPageSize + 40; off + kIndexPageSize < size; off += kIndexPageSize) {
      f.seekp(static_cast<std::streamoff>(off));
      f.put('\x5a');
    }
  }
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
    f.seekp(static_cast<std::streamoff>(pack_header_size(2) + 100));
    f.put('\x00');
    f.seekp(static_cast<std::streamoff>(pack_header_size(2) + 101));
    f.put('\x01');
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
  auto fresh = Repository::open(t.root());
  auto pl = fresh->points(kVdi);
  REQUIRE(pl.points.size() == 2);
  CHECK(t.read_all(kVdi, pl.points[0]->seq) == versions[3]);
  CHECK(t.read_all(kVdi, pl.points[1]->seq) == versions[4]);
  CHECK(verify_vdi(*fresh, kVdi).problems.empty());
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
