// Retention selection and prune on a real local repository.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "cbtfs/errors.hpp"
#include "cbtfs/prune.hpp"
#include "cbtfs/verify.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;
namespace fs = std::filesystem;

namespace {
constexpr int64_t kDay = 86400;
constexpr int64_t kT0 = 1795489200;  // 2026-11-24T03:00:00Z, a Tuesday

std::vector<size_t> kept_indexes(const std::vector<int64_t>& times, RetentionPolicy p) {
  auto keep = select_kept(times, p);
  std::vector<size_t> out;
  for (size_t i = 0; i < keep.size(); ++i)
    if (keep[i]) out.push_back(i);
  return out;
}
}  // namespace

TEST_CASE("retention: keep-last and the newest point") {
  std::vector<int64_t> t;
  for (int i = 0; i < 10; ++i) t.push_back(kT0 + i * 3600);
  CHECK(kept_indexes(t, {.last = 3}) == std::vector<size_t>{7, 8, 9});
  CHECK(kept_indexes(t, {.last = 20}).size() == 10);
  CHECK(kept_indexes(t, {.daily = 1}) == std::vector<size_t>{9});
  CHECK(kept_indexes({}, {.last = 1}).empty());
}

TEST_CASE("retention: daily keeps the newest point of each of the last N days") {
  std::vector<int64_t> t;
  for (int d = 0; d < 10; ++d)
    for (int h = 0; h < 3; ++h) t.push_back(kT0 + d * kDay + h * 3600);  // three a day
  auto k = kept_indexes(t, {.daily = 4});
  CHECK(k == std::vector<size_t>{20, 23, 26, 29});
  // weekly over 10 days starting on a Tuesday: two ISO weeks (Tue-Sun, Mon-Thu).
  k = kept_indexes(t, {.weekly = 5});
  CHECK(k.size() == 2);
  CHECK(k.back() == 29);
  CHECK(k.front() == 17);  // Sunday 2026-11-29 05:00, the newest of the first week
  // Rules add up.
  CHECK(kept_indexes(t, {.last = 2, .daily = 2}) == std::vector<size_t>{26, 28, 29});
}

TEST_CASE("retention: monthly and yearly buckets") {
  std::vector<int64_t> t;
  for (int m = 0; m < 30; ++m) t.push_back(kT0 + m * 30 * kDay);
  auto monthly = kept_indexes(t, {.monthly = 6});
  CHECK(monthly.size() == 6);
  auto yearly = kept_indexes(t, {.yearly = 5});
  CHECK(yearly.size() == 4);  // 2026, 2027, 2028, 2029
}

TEST_CASE("prune keeps every remaining point bit-identical and frees what nothing needs") {
  TestRepo t;
  Bytes d = random_bytes(64 * kBlockSize, 1);
  std::map<uint32_t, Bytes> states;
  for (int i = 0; i < 12; ++i) {
    if (i) {  // each point rewrites 4 blocks; point 6 rewrites the whole disk
      if (i == 6) d = random_bytes(d.size(), 99);
      for (int k = 0; k < 4; ++k) {
        size_t b = static_cast<size_t>((i * 7 + k * 13) % 64);
        Bytes nb = random_bytes(kBlockSize, static_cast<uint32_t>(i * 100 + k));
        std::memcpy(d.data() + b * kBlockSize, nb.data(), kBlockSize);
      }
    }
    states[t.write(kVdi, d, kT0 + i * kDay).seq] = d;
  }
  fs::path packs = fs::path(t.root()) / "vdis" / kVdi / "packs";
  auto before = std::distance(fs::directory_iterator(packs), fs::directory_iterator());

  auto dry = prune_vdi(t.repo, kVdi, {.last = 3}, true, "t");
  CHECK(dry.removed.size() == 9);
  CHECK(t.repo->points(kVdi).points.size() == 12);

  auto r = prune_vdi(t.repo, kVdi, {.last = 3}, false, "t");
  CHECK(r.removed.size() == 9);
  CHECK(r.kept.size() == 3);
  CHECK(r.packs_deleted >= 5);  // points 7..9 replaced nothing of 1..5 that 10..12 still need... 6 rewrote all
  CHECK(r.bytes_freed > 0);
  CHECK(r.bytes_freed == dry.bytes_freed);
  auto after = std::distance(fs::directory_iterator(packs), fs::directory_iterator());
  CHECK(before - after == static_cast<long>(r.packs_deleted));

  auto repo = Repository::open(t.root());
  auto pl = repo->points(kVdi);
  REQUIRE(pl.points.size() == 3);
  for (auto& m : pl.points) {
    PointReader reader(repo, m);
    Bytes out(m->virtual_size);
    reader.read(0, out);
    CHECK(out == states[m->seq]);
  }
  CHECK(verify_vdi(*repo, kVdi).problems.empty());
  CHECK(verify_vdi(*repo, kVdi).warnings.empty());
  // A writer after a prune makes a delta of the newest point, and leaves the
  // older packs that remaining points share alone.
  d[0] ^= std::byte{1};
  Manifest m = t.write(kVdi, d, kT0 + 20 * kDay);
  CHECK(m.parent == 12);
  CHECK(t.read_all(kVdi, m.seq) == d);
  CHECK(verify_vdi(*Repository::open(t.root()), kVdi).problems.empty());
}

TEST_CASE("prune refuses without a rule, and forget drops a VDI") {
  TestRepo t;
  t.write(kVdi, random_bytes(kBlockSize, 1), kT0);
  CHECK_THROWS_AS(prune_vdi(t.repo, kVdi, {}, false, "t"), UsageError);
  forget_vdi(t.repo, kVdi, "t");
  CHECK(!t.repo->has_vdi(kVdi));
  CHECK(t.repo->points(kVdi).points.empty());
  CHECK_THROWS_AS(forget_vdi(t.repo, "1b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01", "t"), UsageError);
}

TEST_CASE("prune gives back, in place, the space of records only removed points used") {
  TestRepo t;
  const size_t n = 64;
  Bytes d1 = random_bytes(n * kBlockSize, 1);  // incompressible: records fill whole file-system blocks
  t.write(kVdi, d1, 1000);
  Bytes d2 = d1;
  for (size_t b = 0; b < n; b += 2) {  // the second point rewrites every other block
    Bytes x = random_bytes(kBlockSize, 100 + static_cast<uint32_t>(b));
    std::memcpy(d2.data() + b * kBlockSize, x.data(), kBlockSize);
  }
  t.write(kVdi, d2, 2000);
  fs::path pack1 = fs::path(t.root()) / "vdis" / kVdi / "packs" / "00000001.pack";
  struct stat before{};
  REQUIRE(::stat(pack1.c_str(), &before) == 0);

  RetentionPolicy keep1;
  keep1.last = 1;
  auto dry = prune_vdi(t.repo, kVdi, keep1, true, "unit test");
  auto r = prune_vdi(t.repo, kVdi, keep1, false, "unit test");
  CHECK(r.packs_deleted == 0);  // the second point still uses half of the first pack
  CHECK(r.bytes_freed >= (n / 2) * kBlockSize - n * 4096);
  CHECK(dry.bytes_freed == r.bytes_freed);
  struct stat after{};
  REQUIRE(::stat(pack1.c_str(), &after) == 0);
  CHECK(after.st_size == before.st_size);  // offsets unchanged: nothing moved
  CHECK(static_cast<uint64_t>(before.st_blocks - after.st_blocks) * 512 >= r.bytes_freed / 2);
  // What remains reads back exactly and verifies.
  auto clean = Repository::open(t.root());
  CHECK(verify_vdi(*clean, kVdi).problems.empty());
  PointReader pr(clean, clean->latest(kVdi));
  Bytes out(d2.size());
  pr.read(0, out);
  CHECK(out == d2);
}
