// Fills a format 2 repository's dedup index with synthetic entries (random
// ids naming records of packs that do not exist), so that what a large
// repository's index costs a writer can be measured without a large
// repository (bench/format2_scale.py). SEGMENTS 1 gives one merged segment,
// as a collection leaves the index; more give one per pack, as writers do
// between collections.
//
//   fill-index REPO ENTRIES SEGMENTS
#include <cstdio>
#include <cstdlib>
#include <random>

#include "cbtfs/layout.hpp"
#include "cbtfs/repository.hpp"
#include "repo/dedup_index.hpp"

using namespace cbtfs;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: fill-index REPO ENTRIES SEGMENTS\n");
    return 2;
  }
  auto repo = Repository::open(argv[1]);
  uint64_t entries = std::strtoull(argv[2], nullptr, 10), segments = std::strtoull(argv[3], nullptr, 10);
  if (segments == 0 || entries < segments) return 2;
  std::mt19937_64 rnd(42);
  uint64_t per = entries / segments;
  for (uint64_t s = 0; s < segments; ++s) {
    uint64_t id = (uint64_t{1} << 62) | (s + 1);
    std::vector<BlockRef> refs(s + 1 == segments ? entries - per * s : per);
    for (size_t i = 0; i < refs.size(); ++i) {
      BlockRef& r = refs[i];
      for (auto& b : r.id) b = static_cast<uint8_t>(rnd());
      r.pack = segments == 1 ? (uint64_t{1} << 62) | (i / 2000 + 1) : id;  // about 2000 records a pack
      r.offset = 24 + (i % 2000) * 40000;
      r.stored_len = 40000;
      r.hash = rnd();
    }
    repo->storage().put(layout::store_index_key(id), encode_index_segment(std::move(refs), segments == 1 ? 0 : id));
  }
  return 0;
}
