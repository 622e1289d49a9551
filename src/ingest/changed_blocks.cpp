#include "changed_blocks.hpp"

#include <openssl/evp.h>

#include <string>

namespace cbtfs::ingest {

std::vector<bool> decode_changed_blocks(std::string_view base64, uint64_t nblocks) {
  std::string clean;
  clean.reserve(base64.size());
  for (char c : base64)
    if (c != '\n' && c != '\r' && c != ' ' && c != '\t') clean += c;
  if (clean.size() % 4) throw BitmapError("changed-block bitmap is not valid base64 (length " + std::to_string(clean.size()) + ")");
  // '=' may only pad the end, at most twice.
  size_t pad = 0;
  while (pad < clean.size() && clean[clean.size() - 1 - pad] == '=') ++pad;
  if (pad > 2 || clean.find('=') < clean.size() - pad) throw BitmapError("changed-block bitmap is not valid base64");
  std::vector<unsigned char> bytes(clean.size() / 4 * 3 + 1);
  int n = clean.empty() ? 0
                        : EVP_DecodeBlock(bytes.data(), reinterpret_cast<const unsigned char*>(clean.data()),
                                          static_cast<int>(clean.size()));
  if (n < 0) throw BitmapError("changed-block bitmap is not valid base64");
  // EVP_DecodeBlock counts the bytes the '=' padding stands for.
  size_t len = static_cast<size_t>(n) - pad;
  uint64_t need = (nblocks + 7) / 8;
  if (len < need)
    throw BitmapError("changed-block bitmap has " + std::to_string(len) + " bytes; a disk of " + std::to_string(nblocks) +
                      " blocks needs " + std::to_string(need));
  std::vector<bool> bits(nblocks);
  for (uint64_t b = 0; b < nblocks; ++b) bits[b] = bytes[b / 8] & (0x80 >> (b % 8));
  return bits;
}

std::vector<Extent> changed_extents(const std::vector<bool>& bits, uint64_t max_blocks) {
  std::vector<Extent> out;
  for (uint64_t b = 0; b < bits.size();) {
    if (!bits[b]) {
      ++b;
      continue;
    }
    uint64_t start = b;
    while (b < bits.size() && bits[b] && b - start < max_blocks) ++b;
    out.push_back({start, b - start});
  }
  return out;
}

std::vector<Extent> all_extents(uint64_t nblocks, uint64_t max_blocks) {
  std::vector<Extent> out;
  for (uint64_t b = 0; b < nblocks; b += max_blocks) out.push_back({b, std::min(max_blocks, nblocks - b)});
  return out;
}

}  // namespace cbtfs::ingest
