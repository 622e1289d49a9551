// Encryption at rest: what an encrypted repository stores is sealed with
// an AEAD, AES-256-OCB (RFC 7253) or AES-256-GCM as its header says
// (libgcrypt, with AES-NI):
//
//   nonce (12 random bytes) || ciphertext || tag (16 bytes)
//
// Each seal is bound to what the sealed thing is and where it belongs (the
// associated data: a record's id and encoding, a manifest's VDI and
// number), so no stored object can stand in for another, and a truncated or
// altered one fails to open: CorruptError, never data.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "cbtfs/format.hpp"

namespace cbtfs {

constexpr size_t kNonceSize = 12, kTagSize = 16, kSealOverhead = kNonceSize + kTagSize;
using DataKey = std::array<uint8_t, 32>;

class Sealer {
 public:
  explicit Sealer(const DataKey& key, Cipher cipher = Cipher::aes256_gcm);
  // plain sealed, bound to aad.
  Bytes seal(std::span<const std::byte> plain, std::span<const std::byte> aad) const;
  // Opens sealed into out, which must be sealed.size() - kSealOverhead
  // bytes. Throws CorruptError if it was not sealed with this key and aad.
  void open(std::span<const std::byte> sealed, std::span<const std::byte> aad, std::span<std::byte> out) const;

 private:
  DataKey key_;
  Cipher cipher_;
  uint64_t serial_;  // tells this sealer's keyed contexts from another's (see seal.cpp)
};

// A record of an encrypted repository: its encoding (encode_record's
// output) sealed, bound to the record's id and to whether it is stored
// raw. ref.stored_len grows by kSealOverhead; its raw flag is kept.
Bytes seal_record(const Sealer& s, std::span<const std::byte> encoded, BlockRef& ref);
// encode_record's output, sealed when the repository is encrypted (sealer
// not null; ref.id set): what a writer stores.
Bytes encode_stored_record(Bytes&& plain, BlockRef& ref, uint64_t hash, const Sealer* sealer, bool compress = true);
// Opens, decodes and checks a sealed record into out (decode_record's
// contract: CorruptError, never bad data).
void open_record(const Sealer& s, std::span<const std::byte> stored, const BlockRef& ref, std::span<std::byte> out);

// A manifest of an encrypted repository, bound to its VDI and number, in
// a frame whose checksum needs no key.
Bytes seal_manifest(const Sealer& s, std::span<const std::byte> encoded, const std::string& vdi, uint32_t seq);
Bytes open_manifest(const Sealer& s, std::span<const std::byte> stored, const std::string& vdi, uint32_t seq);
// A VDI's point list (point_list.hpp), bound to its VDI and generation, in
// the same frame.
Bytes seal_point_list(const Sealer& s, std::span<const std::byte> encoded, const std::string& vdi, uint32_t generation);
Bytes open_point_list(const Sealer& s, std::span<const std::byte> stored, const std::string& vdi, uint32_t generation);
// Whether a sealed manifest's or point list's frame and checksum hold (no
// key needed).
bool sealed_frame_intact(std::span<const std::byte> stored);
// Whether it starts as a frame does: a manifest that does not was sealed
// before frames existed (or was damaged in its first 8 bytes), which only
// the key can tell apart.
bool is_framed(std::span<const std::byte> stored);

}  // namespace cbtfs
