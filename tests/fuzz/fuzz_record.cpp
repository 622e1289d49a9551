// The block decode path: a format (first byte), a ref of that format, and
// stored bytes (the rest) either decode to data whose checksum matches, or
// throw CorruptError.
#include <cstddef>
#include <cstdint>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  uint32_t format = (data[0] & 1) + 1;
  ++data;
  --size;
  if (size < cbtfs::ref_size(format)) return 0;
  auto* p = reinterpret_cast<const std::byte*>(data);
  cbtfs::BlockRef ref = cbtfs::decode_ref(p, format);
  std::span<const std::byte> stored(p + cbtfs::ref_size(format), size - cbtfs::ref_size(format));
  cbtfs::Bytes out(cbtfs::kBlockSize);
  try {
    cbtfs::decode_record(stored, ref, out);
    if (cbtfs::hash_bytes(out) != ref.hash) __builtin_trap();
  } catch (const cbtfs::CorruptError&) {
  }
  cbtfs::Bytes pack_header(p, p + std::min<size_t>(size, cbtfs::pack_header_size(format)));
  try {
    cbtfs::check_pack_header(pack_header, 1, format, "fuzz");
  } catch (const cbtfs::FormatError&) {
  }
  return 0;
}
