// Test helpers: a temporary repository directory and deterministic data.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include "cbtfs/point_reader.hpp"
#include "cbtfs/point_writer.hpp"

namespace cbtfs::test {

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/cbtfs-unit-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string str() const { return path.string(); }
};

inline Bytes random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<std::byte>(rng());
  return b;
}

// Text-like data: compresses well, but differs per seed.
inline Bytes text_bytes(size_t n, uint32_t seed) {
  Bytes b(n);
  std::string line = "cbtfs test line " + std::to_string(seed) + " lorem ipsum dolor sit amet\n";
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>(line[i % line.size()]);
  return b;
}

struct TestRepo {
  TempDir dir;
  std::shared_ptr<Repository> repo;
  explicit TestRepo(uint32_t format = 1) {
    Repository::init(dir.str() + "/r", format);
    repo = Repository::open(dir.str() + "/r");
  }
  std::string root() const { return dir.str() + "/r"; }
  // Writes a whole disk image as the next point; returns its manifest.
  Manifest write(const std::string& vdi, const Bytes& disk, int64_t time, bool force_full = false) {
    PointInfo info;
    info.time = time;
    info.force_full = force_full;
    if (force_full) info.chain_reason = "test";
    info.virtual_size = disk.size();
    PointWriter w(repo, vdi, info, "unit test");
    uint64_t n = w.block_count();
    Bytes block(kBlockSize);
    for (uint64_t b = 0; b < n; ++b) {
      size_t off = b * kBlockSize;
      size_t len = std::min<size_t>(kBlockSize, disk.size() - off);
      std::fill(block.begin(), block.end(), std::byte{0});
      std::copy(disk.begin() + static_cast<ptrdiff_t>(off), disk.begin() + static_cast<ptrdiff_t>(off + len), block.begin());
      w.put_block(b, block);
    }
    return w.commit();
  }
  Bytes read_all(const std::string& vdi, uint32_t seq) {
    for (auto& m : repo->points(vdi).points)
      if (m->seq == seq) {
        PointReader r(repo, m);
        Bytes out(m->virtual_size);
        r.read(0, out);
        return out;
      }
    throw std::runtime_error("no such point");
  }
};

inline const std::string kVdi = "0b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01";

}  // namespace cbtfs::test
