// Point manifests and the repository header: any bytes give a manifest or a
// FormatError, never a crash.
#include <cstddef>
#include <cstdint>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  try {
    cbtfs::Manifest m = cbtfs::decode_manifest(in, "fuzz");
    // What decodes must encode and decode to the same point.
    cbtfs::Manifest again = cbtfs::decode_manifest(cbtfs::encode_manifest(m), "fuzz");
    if (!(again.root == m.root) || again.virtual_size != m.virtual_size) __builtin_trap();
  } catch (const cbtfs::FormatError&) {
  }
  try {
    cbtfs::check_repo_header(in, "fuzz");
  } catch (const cbtfs::FormatError&) {
  }
  return 0;
}
