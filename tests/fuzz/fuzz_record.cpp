// The block decode path: a ref (first 24 bytes) and stored bytes (the rest)
// either decode to data whose checksum matches, or throw CorruptError.
#include <cstddef>
#include <cstdint>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < cbtfs::kRefSize) return 0;
  auto* p = reinterpret_cast<const std::byte*>(data);
  cbtfs::BlockRef ref = cbtfs::decode_ref(p);
  std::span<const std::byte> stored(p + cbtfs::kRefSize, size - cbtfs::kRefSize);
  cbtfs::Bytes out(cbtfs::kBlockSize);
  try {
    cbtfs::decode_record(stored, ref, out);
    if (cbtfs::hash_bytes(out) != ref.hash) __builtin_trap();
  } catch (const cbtfs::CorruptError&) {
  }
  cbtfs::Bytes pack_header(p, p + std::min<size_t>(size, cbtfs::kPackHeaderSize));
  try {
    cbtfs::check_pack_header(pack_header, 1, "fuzz");
  } catch (const cbtfs::FormatError&) {
  }
  return 0;
}
