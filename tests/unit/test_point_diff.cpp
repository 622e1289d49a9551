// changed_blocks_between: the blocks two points differ in, from their index
// trees, checked against a byte-by-byte comparison of the two images.
#include <catch2/catch.hpp>
#include <cstring>

#include "cbtfs/point_diff.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;

namespace {

Bytes disk_of(size_t nblocks, size_t tail, uint32_t seed) {
  Bytes d(nblocks * kBlockSize + tail);
  for (size_t b = 0; b * kBlockSize < d.size(); ++b) {
    if (b % 4 == 3) continue;  // some zero blocks
    size_t len = std::min<size_t>(kBlockSize, d.size() - b * kBlockSize);
    Bytes src = random_bytes(kBlockSize, seed * 1000 + static_cast<uint32_t>(b));
    std::memcpy(d.data() + b * kBlockSize, src.data(), len);
  }
  return d;
}

// Blocks whose bytes differ, the shorter image read as zeros past its end.
std::vector<uint64_t> differing(const Bytes& x, const Bytes& y) {
  std::vector<uint64_t> out;
  size_t n = std::max(x.size(), y.size());
  // Both padded with zeros to the longer one's length: then a memcmp per
  // block (a byte loop takes minutes under ASan on images of 64+ MiB).
  Bytes a = x, c = y;
  a.resize(n);
  c.resize(n);
  for (size_t b = 0; b * kBlockSize < n; ++b) {
    size_t at = b * kBlockSize, len = std::min<size_t>(n - at, kBlockSize);
    if (std::memcmp(a.data() + at, c.data() + at, len) != 0) out.push_back(b);
  }
  return out;
}

std::vector<uint64_t> blocks_of(const std::vector<BlockRun>& runs) {
  std::vector<uint64_t> out;
  for (auto& r : runs) {
    REQUIRE(r.count > 0);
    for (uint64_t i = 0; i < r.count; ++i) out.push_back(r.first + i);
  }
  for (size_t i = 1; i < runs.size(); ++i) CHECK(runs[i].first > runs[i - 1].first + runs[i - 1].count);  // merged
  return out;
}

ManifestPtr point(TestRepo& t, uint32_t seq) {
  for (auto& m : t.repo->points(kVdi).points)
    if (m->seq == seq) return m;
  FAIL("no point " << seq);
  return nullptr;
}

}  // namespace

TEST_CASE("a point's diff with itself is empty; with a delta, exactly the blocks written") {
  for (uint32_t format : {1u, 2u}) {
    TestRepo t(format);
    Bytes d1 = disk_of(300, 0, 1);
    t.write(kVdi, d1, 1000);
    Bytes d2 = d1;
    d2[5 * kBlockSize + 1] ^= std::byte{1};
    d2[6 * kBlockSize] ^= std::byte{1};                      // adjacent: one run
    std::memset(d2.data() + 100 * kBlockSize, 0, kBlockSize);  // data zeroed
    d2[103 * kBlockSize + 7] = std::byte{9};                   // a zero block gets data
    d2[299 * kBlockSize + 9] ^= std::byte{4};                  // the last block
    t.write(kVdi, d2, 2000);
    auto a = point(t, 1), b = point(t, 2);
    CHECK(changed_blocks_between(*t.repo, *a, *a).empty());
    auto runs = changed_blocks_between(*t.repo, *a, *b);
    CHECK(blocks_of(runs) == std::vector<uint64_t>{5, 6, 100, 103, 299});
    CHECK(runs.size() == 4);
    CHECK(block_total(runs) == 5);
    CHECK(blocks_of(changed_blocks_between(*t.repo, *b, *a)) == blocks_of(runs));  // symmetric
  }
}

TEST_CASE("across several deltas and a disk spanning more than one index node") {
  TestRepo t;
  // 1500 blocks: depth 2, the second node partly used; size not a multiple of 64 KiB.
  Bytes d = disk_of(1500, 777, 2);
  t.write(kVdi, d, 1000);
  Bytes d1 = d;
  std::vector<Bytes> disks{d};
  for (uint32_t i = 0; i < 4; ++i) {
    for (size_t b : {i * 37u + 1, 1024u + i * 11, 1500u}) d1[b * kBlockSize + (b == 1500 ? 3 : 100)] = std::byte(0x20 + i);
    t.write(kVdi, d1, 2000 + i);
    disks.push_back(d1);
  }
  for (uint32_t x = 1; x <= 5; ++x)
    for (uint32_t y = 1; y <= 5; ++y)
      CHECK(blocks_of(changed_blocks_between(*t.repo, *point(t, x), *point(t, y))) == differing(disks[x - 1], disks[y - 1]));
}

TEST_CASE("a new full chain: format 1 may over-report but never misses; format 2 is exact") {
  for (uint32_t format : {1u, 2u}) {
    TestRepo t(format);
    Bytes d1 = disk_of(200, 0, 3);
    t.write(kVdi, d1, 1000);
    Bytes d2 = d1;
    d2[17 * kBlockSize] ^= std::byte{1};
    t.write(kVdi, d2, 2000, /*force_full=*/true);
    auto got = blocks_of(changed_blocks_between(*t.repo, *point(t, 1), *point(t, 2)));
    auto want = differing(d1, d2);
    REQUIRE(want == std::vector<uint64_t>{17});
    if (format == 2) {
      CHECK(got == want);
    } else {
      CHECK(std::includes(got.begin(), got.end(), want.begin(), want.end()));
    }
  }
}

TEST_CASE("points of different sizes differ past the shorter one's end") {
  TestRepo t;
  Bytes d1 = disk_of(100, 100, 4);
  t.write(kVdi, d1, 1000);
  Bytes d2 = d1;
  d2.resize(150 * kBlockSize);  // grown: new chain
  d2[3 * kBlockSize] ^= std::byte{1};
  t.write(kVdi, d2, 2000);
  auto got = blocks_of(changed_blocks_between(*t.repo, *point(t, 1), *point(t, 2)));
  auto want = differing(d1, d2);
  CHECK(std::includes(got.begin(), got.end(), want.begin(), want.end()));
  CHECK(got.back() == 149);
  for (uint64_t b = 100; b < 150; ++b) CHECK(std::find(got.begin(), got.end(), b) != got.end());
}

TEST_CASE("points whose trees have different depths count every block") {
  TestRepo t;
  Bytes d1 = disk_of(10, 0, 5);
  t.write(kVdi, d1, 1000);
  Bytes d2 = d1;
  d2.resize(2000 * kBlockSize);
  t.write(kVdi, d2, 2000);
  auto runs = changed_blocks_between(*t.repo, *point(t, 1), *point(t, 2));
  REQUIRE(runs.size() == 1);
  CHECK(runs[0] == BlockRun{0, 2000});
}
