#include "cbtfs/point_diff.hpp"

#include <algorithm>

namespace cbtfs {

namespace {

// Whether two refs name the same contents. Format 1: the same record (a
// delta keeps its parent's ref for an unchanged block or subtree). Format 2:
// the same keyed id, a name of the contents no guest can make collide.
bool same(const BlockRef& x, const BlockRef& y, uint32_t format) {
  if (x.is_zero() || y.is_zero()) return x.is_zero() && y.is_zero();
  if (format >= 2) return x.id == y.id && x.hash == y.hash && x.length() == y.length();
  return x == y;
}

class Walk {
 public:
  Walk(Repository& repo, const Manifest& a, const Manifest& b, uint64_t nblocks)
      : repo_(repo), a_(a), b_(b), nblocks_(nblocks) {}

  void run(const BlockRef& ra, const BlockRef& rb, uint32_t level, uint64_t base) {
    if (base >= nblocks_ || same(ra, rb, repo_.format())) return;
    if (level == 0) {
      add(base, 1);
      return;
    }
    // A zero ref is a subtree of zeros: all its entries are zero refs.
    std::shared_ptr<const Bytes> na = ra.is_zero() ? nullptr : repo_.node(a_.vdi, ra, false);
    std::shared_ptr<const Bytes> nb = rb.is_zero() ? nullptr : repo_.node(b_.vdi, rb, false);
    uint64_t span = blocks_under(level - 1);
    for (uint64_t i = 0; i < kFanout; ++i) {
      uint64_t lo = base + i * span;
      if (lo >= nblocks_) break;
      BlockRef ea = na ? IndexNode(*na, repo_.format())[i] : BlockRef{};
      BlockRef eb = nb ? IndexNode(*nb, repo_.format())[i] : BlockRef{};
      run(ea, eb, level - 1, lo);
    }
  }

  void add(uint64_t first, uint64_t count) {
    if (count == 0) return;
    if (!out.empty() && out.back().first + out.back().count == first) {
      out.back().count += count;
      return;
    }
    out.push_back({first, count});
  }

  std::vector<BlockRun> out;

 private:
  Repository& repo_;
  const Manifest &a_, &b_;
  uint64_t nblocks_;
};

}  // namespace

std::vector<BlockRun> changed_blocks_between(Repository& repo, const Manifest& a, const Manifest& b) {
  const uint64_t na = block_count(a.virtual_size), nb = block_count(b.virtual_size);
  const uint64_t n = std::max(na, nb);
  Walk w(repo, a, b, n);
  if (a.depth != b.depth) {
    w.add(0, n);
    return w.out;
  }
  const uint64_t common = std::min(na, nb);
  Walk inside(repo, a, b, common);
  inside.run(a.root, b.root, a.depth, 0);
  // The last block of the shorter point ends early: past its end the other
  // point's bytes need not be zeros, whatever the trees say.
  if (a.virtual_size != b.virtual_size && common > 0) {
    bool last_in = !inside.out.empty() && inside.out.back().first + inside.out.back().count == common;
    if (a.virtual_size % kBlockSize || b.virtual_size % kBlockSize) {
      if (!last_in) inside.add(common - 1, 1);
    }
  }
  for (auto& r : inside.out) w.add(r.first, r.count);
  w.add(common, n - common);
  return w.out;
}

uint64_t block_total(const std::vector<BlockRun>& runs) {
  uint64_t n = 0;
  for (auto& r : runs) n += r.count;
  return n;
}

}  // namespace cbtfs
