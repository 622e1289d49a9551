// Fault sweeps: an I/O error or a full disk at every single storage
// operation of an import, a prune and a forget. Whatever step fails, the
// command reports it, the repository still verifies, every point that
// existed before is intact, and the next clean run succeeds.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "cbtfs/open_storage.hpp"
#include "cbtfs/prune.hpp"
#include "cbtfs/verify.hpp"
#include "fault_storage.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;

namespace {

// Forwards to a FaultStorage the test keeps, so its counters outlive the
// repository that owned it.
class Shared final : public Storage {
 public:
  explicit Shared(Storage& s) : s_(s) {}
  void read(const std::string& k, uint64_t o, std::span<std::byte> out) override { s_.read(k, o, out); }
  std::optional<Bytes> get(const std::string& k) override { return s_.get(k); }
  std::optional<uint64_t> size(const std::string& k) override { return s_.size(k); }
  std::vector<std::string> list(const std::string& p) override { return s_.list(p); }
  std::unique_ptr<ObjectWriter> create(const std::string& k) override { return s_.create(k); }
  void remove(const std::string& k) override { s_.remove(k); }
  void remove_temporaries(const std::string& p) override { s_.remove_temporaries(p); }
  std::unique_ptr<StorageLock> try_lock(const std::string& k, const std::string& h) override { return s_.try_lock(k, h); }
  std::string describe() const override { return s_.describe(); }

 private:
  Storage& s_;
};

Bytes disk_version(uint32_t v) {
  Bytes d = random_bytes(24 * kBlockSize + 777, 1);
  for (uint32_t b = 0; b < 24; b += 3) {  // every version rewrites a third of the blocks
    Bytes x = v % 2 ? random_bytes(kBlockSize, v * 100 + b) : text_bytes(kBlockSize, v * 100 + b);
    std::memcpy(d.data() + ((b + v) % 24) * kBlockSize, x.data(), kBlockSize);
  }
  return d;
}

Manifest write_point(std::shared_ptr<Repository> repo, const Bytes& disk, int64_t time) {
  PointInfo info;
  info.time = time;
  info.virtual_size = disk.size();
  PointWriter w(repo, kVdi, info, "fault sweep");
  Bytes block(kBlockSize);
  for (uint64_t b = 0; b < w.block_count(); ++b) {
    size_t off = b * kBlockSize, len = std::min<size_t>(kBlockSize, disk.size() - off);
    std::fill(block.begin(), block.end(), std::byte{0});
    std::memcpy(block.data(), disk.data() + off, len);
    w.put_block(b, block);
  }
  return w.commit();
}

// Opening counts too: the header read can fail like anything else.
std::shared_ptr<Repository> faulty(const TestRepo& t, std::unique_ptr<FaultStorage>& keep, uint64_t fail_at, int err) {
  keep = std::make_unique<FaultStorage>(open_local_storage(t.root()), fail_at, err);
  return Repository::open(std::unique_ptr<Storage>(new Shared(*keep)));
}

// Every point still in the repository reads back as the version it was.
void check_intact(TestRepo& t, const std::map<uint32_t, uint32_t>& version_of_seq) {
  auto clean = Repository::open(t.root());
  auto r = verify_vdi(*clean, kVdi);
  REQUIRE(r.problems.empty());
  for (auto& m : clean->points(kVdi).points) {
    REQUIRE(version_of_seq.count(m->seq));
    PointReader pr(clean, m);
    Bytes out(m->virtual_size);
    pr.read(0, out);
    REQUIRE(out == disk_version(version_of_seq.at(m->seq)));
  }
}

}  // namespace

TEST_CASE("an error at any step of an import loses nothing") {
  for (int err : {EIO, ENOSPC}) {
    TestRepo t;
    std::map<uint32_t, uint32_t> version_of_seq;
    int64_t time = 1000;
    version_of_seq[write_point(t.repo, disk_version(0), time++).seq] = 0;
    // How many operations a clean import takes.
    std::unique_ptr<FaultStorage> counter;
    write_point(faulty(t, counter, 0, err), disk_version(1), time++);
    uint64_t total = counter->operations();
    version_of_seq[2] = 1;
    REQUIRE(total > 10);
    uint32_t v = 2;
    for (uint64_t n = 1; n <= total; ++n, ++v) {
      std::unique_ptr<FaultStorage> fs;
      bool committed = false;
      try {
        auto m = write_point(faulty(t, fs, n, err), disk_version(v), time++);
        committed = true;
        version_of_seq[m.seq] = v;
      } catch (const StorageError& e) {
        CAPTURE(n, e.what());
        CHECK(e.error_number() == err);
      }
      CAPTURE(n);
      CHECK(committed != fs->fired());
      check_intact(t, version_of_seq);
      // The next clean writer cleans up and commits.
      auto clean = Repository::open(t.root());
      version_of_seq[write_point(clean, disk_version(v + 1000), time++).seq] = v + 1000;
      check_intact(t, version_of_seq);
    }
    std::printf("import sweep, %s: %llu faults injected, one at each storage operation, nothing lost\n",
                std::strerror(err), static_cast<unsigned long long>(total));
  }
}

TEST_CASE("an error at any step of a prune or a forget loses nothing that remains") {
  RetentionPolicy keep2;
  keep2.last = 2;
  for (int err : {EIO}) {  // prune and forget mostly remove: a full disk is no different
    for (uint64_t n = 1;; ++n) {
      TestRepo t;
      std::map<uint32_t, uint32_t> version_of_seq;
      for (uint32_t v = 0; v < 6; ++v) version_of_seq[write_point(t.repo, disk_version(v), 1000 + v).seq] = v;
      std::unique_ptr<FaultStorage> fs;
      try {
        prune_vdi(faulty(t, fs, n, err), kVdi, keep2, false, "fault sweep");
      } catch (const StorageError& e) {
        CHECK(e.error_number() == err);
      }
      bool done = !fs->fired();
      // What is left verifies, and reads as it was; a clean re-run finishes.
      auto clean = Repository::open(t.root());
      check_intact(t, version_of_seq);
      prune_vdi(clean, kVdi, keep2, false, "fault sweep");
      REQUIRE(clean->points(kVdi).points.size() == 2);
      check_intact(t, version_of_seq);

      std::unique_ptr<FaultStorage> fs2;
      try {
        forget_vdi(faulty(t, fs2, n, err), kVdi, "fault sweep");
      } catch (const StorageError& e) {
        CHECK(e.error_number() == err);
      }
      check_intact(t, version_of_seq);
      forget_vdi(Repository::open(t.root()), kVdi, "fault sweep");
      CHECK(Repository::open(t.root())->points(kVdi).points.empty());
      if (done && !fs2->fired()) {  // n is past the last operation of both
        std::printf("prune and forget sweep, %s: %llu faults injected each, nothing lost\n", std::strerror(err),
                    static_cast<unsigned long long>(n - 1));
        break;
      }
    }
  }
}
