// The changed-block bitmap: the first byte picks a disk size, the rest is
// the base64 text. Decoded bits and extents must agree.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "ingest/changed_blocks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  uint64_t nblocks = data[0] * 3;
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    auto bits = cbtfs::ingest::decode_changed_blocks(text, nblocks);
    if (bits.size() != nblocks) __builtin_trap();
    uint64_t set = 0, covered = 0;
    for (bool b : bits) set += b;
    for (auto& e : cbtfs::ingest::changed_extents(bits, 32)) {
      if (e.count == 0 || e.count > 32 || e.first + e.count > nblocks) __builtin_trap();
      covered += e.count;
    }
    if (covered != set) __builtin_trap();
  } catch (const cbtfs::ingest::BitmapError&) {
  }
  return 0;
}
