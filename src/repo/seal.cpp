#include "cbtfs/seal.hpp"

#include <endian.h>
#include <lz4.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "cbtfs/errors.hpp"

namespace cbtfs {

namespace {

using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)>;

// Fetched once: OpenSSL 3 looks EVP_aes_256_gcm() up in its providers on
// every init otherwise, which cost more than sealing a 64 KiB record.
const EVP_CIPHER* aes_gcm() {
  static EVP_CIPHER* c = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
  if (!c) throw std::runtime_error("OpenSSL has no AES-256-GCM");
  return c;
}

std::atomic<uint64_t> next_serial{1};

// Each thread keeps a context per direction with the key schedule of the
// sealer it last served; a seal then only sets its nonce. Contexts are
// never shared between threads.
struct KeyedContexts {
  uint64_t serial = 0;
  CipherCtx enc{EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free};
  CipherCtx dec{EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free};
};

KeyedContexts& contexts_for(uint64_t serial, const DataKey& key) {
  thread_local KeyedContexts k;
  if (!k.enc || !k.dec) throw std::bad_alloc();
  if (k.serial != serial) {
    k.serial = 0;
    if (EVP_EncryptInit_ex(k.enc.get(), aes_gcm(), nullptr, key.data(), nullptr) != 1 ||
        EVP_DecryptInit_ex(k.dec.get(), aes_gcm(), nullptr, key.data(), nullptr) != 1)
      throw std::runtime_error("AES-256-GCM setup failed");
    k.serial = serial;
  }
  return k;
}

const unsigned char* u8(const void* p) { return static_cast<const unsigned char*>(p); }
unsigned char* u8(void* p) { return static_cast<unsigned char*>(p); }

// What a record's seal is bound to: its id, and whether its plaintext is
// the block itself or LZ4 (a flipped raw flag must not decode garbage).
std::array<std::byte, 1 + 16 + 1> record_aad(const BlockRef& ref) {
  std::array<std::byte, 18> aad{};
  aad[0] = std::byte{'R'};
  std::memcpy(aad.data() + 1, ref.id.data(), ref.id.size());
  aad[17] = std::byte{static_cast<unsigned char>(ref.raw() ? 1 : 0)};
  return aad;
}

std::string manifest_aad(const std::string& vdi, uint32_t seq) {
  return "M" + vdi + "/" + std::to_string(seq);
}

}  // namespace

Sealer::Sealer(const DataKey& key) : key_(key), serial_(next_serial++) {}

Bytes Sealer::seal(std::span<const std::byte> plain, std::span<const std::byte> aad) const {
  Bytes out(kNonceSize + plain.size() + kTagSize);
  // Random nonces: a key seals at most about 2^32 objects before a repeat
  // becomes likelier than 2^-32 (NIST SP 800-38D); at 64 KiB per record
  // that is 256 TiB stored, far past any one repository's key.
  if (RAND_bytes(u8(out.data()), kNonceSize) != 1) throw std::runtime_error("no random bytes for a nonce");
  EVP_CIPHER_CTX* c = contexts_for(serial_, key_).enc.get();
  int n = 0;
  bool ok = EVP_EncryptInit_ex(c, nullptr, nullptr, nullptr, u8(out.data())) == 1 &&
            EVP_EncryptUpdate(c, nullptr, &n, u8(aad.data()), static_cast<int>(aad.size())) == 1 &&
            EVP_EncryptUpdate(c, u8(out.data() + kNonceSize), &n, u8(plain.data()), static_cast<int>(plain.size())) == 1 &&
            EVP_EncryptFinal_ex(c, u8(out.data() + kNonceSize + n), &n) == 1 &&
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, kTagSize, out.data() + kNonceSize + plain.size()) == 1;
  if (!ok) throw std::runtime_error("AES-256-GCM sealing failed");
  return out;
}

void Sealer::open(std::span<const std::byte> sealed, std::span<const std::byte> aad, std::span<std::byte> out) const {
  if (sealed.size() < kSealOverhead || out.size() != sealed.size() - kSealOverhead)
    throw CorruptError("sealed object of impossible size");
  EVP_CIPHER_CTX* c = contexts_for(serial_, key_).dec.get();
  int n = 0;
  bool ok = EVP_DecryptInit_ex(c, nullptr, nullptr, nullptr, u8(sealed.data())) == 1 &&
            EVP_DecryptUpdate(c, nullptr, &n, u8(aad.data()), static_cast<int>(aad.size())) == 1 &&
            EVP_DecryptUpdate(c, u8(out.data()), &n, u8(sealed.data() + kNonceSize), static_cast<int>(out.size())) == 1 &&
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, kTagSize,
                                const_cast<std::byte*>(sealed.data() + sealed.size() - kTagSize)) == 1 &&
            EVP_DecryptFinal_ex(c, u8(out.data() + n), &n) == 1;
  if (!ok) {
    // Whatever was decrypted before the tag failed is not data.
    std::memset(out.data(), 0, out.size());
    throw CorruptError("does not open with the repository's key (altered, truncated, or moved from elsewhere)");
  }
}

Bytes seal_record(const Sealer& s, std::span<const std::byte> encoded, BlockRef& ref) {
  auto aad = record_aad(ref);
  Bytes out = s.seal(encoded, aad);
  ref.stored_len = static_cast<uint32_t>(out.size()) | (ref.stored_len & BlockRef::kRawFlag);
  return out;
}

Bytes encode_stored_record(Bytes&& plain, BlockRef& ref, uint64_t hash, const Sealer* sealer, bool compress) {
  Bytes encoded = encode_record(std::move(plain), ref, hash, compress);
  if (!sealer && ref.raw()) {
    // Stored as it is: the block's own checksum is the stored bytes',
    // and a second pass over them would only compute it again.
    ref.stored_check = stored_check_of_hash(hash);
    return encoded;
  }
  Bytes stored = sealer ? seal_record(*sealer, encoded, ref) : std::move(encoded);
  ref.stored_check = stored_check(stored);
  return stored;
}

void open_record(const Sealer& s, std::span<const std::byte> stored, const BlockRef& ref, std::span<std::byte> out) {
  if (stored.size() != ref.length() || stored.size() < kSealOverhead) throw CorruptError("record length mismatch");
  auto aad = record_aad(ref);
  size_t inner = stored.size() - kSealOverhead;
  if (ref.raw()) {
    if (inner != out.size()) throw CorruptError("raw record has the wrong size");
    s.open(stored, aad, out);
  } else {
    // Grown once, never shrunk: resize() would zero what it grows by at
    // every record larger than the one before.
    thread_local Bytes buffer;
    if (buffer.size() < inner) buffer.resize(inner);
    auto plain = std::span<std::byte>(buffer).first(inner);
    s.open(stored, aad, plain);
    int n = LZ4_decompress_safe(reinterpret_cast<const char*>(plain.data()), reinterpret_cast<char*>(out.data()),
                                static_cast<int>(plain.size()), static_cast<int>(out.size()));
    if (n != static_cast<int>(out.size())) throw CorruptError("record does not decompress");
  }
  // No XXH3 pass: the tag, a 128-bit MAC over exactly the bytes sealed
  // for this id, is the stronger check, and a pass over every block read
  // costs the mount a tenth of its speed.
}

// Sealed metadata (manifests, point lists) is framed: magic, the seal, then
// XXH3-64 of both, so that what is stored can be checked without the key.
namespace {
constexpr std::array<char, 8> kFrameMagic = {'C', 'B', 'T', 'F', 'S', 'S', 'M', '1'};
constexpr size_t kFrameHead = kFrameMagic.size(), kFrameTail = 8;

Bytes seal_in_frame(const Sealer& s, std::span<const std::byte> encoded, const std::string& aad) {
  Bytes sealed = s.seal(encoded, std::as_bytes(std::span(aad)));
  Bytes out(kFrameHead + sealed.size() + kFrameTail);
  std::memcpy(out.data(), kFrameMagic.data(), kFrameHead);
  std::memcpy(out.data() + kFrameHead, sealed.data(), sealed.size());
  uint64_t sum = htole64(hash_bytes(std::span(out).first(out.size() - kFrameTail)));
  std::memcpy(out.data() + out.size() - kFrameTail, &sum, kFrameTail);
  return out;
}

// bare_too: a manifest sealed before frames existed (cbtfs's first
// encrypted repositories) is the seal alone; its tag is still the check
// (a framed one whose magic was damaged fails it).
Bytes open_frame(const Sealer& s, std::span<const std::byte> stored, const std::string& aad, bool bare_too) {
  std::span<const std::byte> sealed = stored;
  if (is_framed(stored) || !bare_too) {
    if (!sealed_frame_intact(stored)) throw CorruptError("damaged (its stored checksum differs)");
    sealed = stored.subspan(kFrameHead, stored.size() - kFrameHead - kFrameTail);
  }
  if (sealed.size() < kSealOverhead) throw CorruptError("sealed object too short");
  Bytes out(sealed.size() - kSealOverhead);
  s.open(sealed, std::as_bytes(std::span(aad)), out);
  return out;
}
}  // namespace

bool is_framed(std::span<const std::byte> stored) {
  return stored.size() >= kFrameHead && std::memcmp(stored.data(), kFrameMagic.data(), kFrameHead) == 0;
}

bool sealed_frame_intact(std::span<const std::byte> stored) {
  if (stored.size() < kFrameHead + kSealOverhead + kFrameTail || !is_framed(stored)) return false;
  uint64_t sum = 0;
  std::memcpy(&sum, stored.data() + stored.size() - kFrameTail, kFrameTail);
  return hash_bytes(stored.first(stored.size() - kFrameTail)) == le64toh(sum);
}

Bytes seal_manifest(const Sealer& s, std::span<const std::byte> encoded, const std::string& vdi, uint32_t seq) {
  return seal_in_frame(s, encoded, manifest_aad(vdi, seq));
}

Bytes open_manifest(const Sealer& s, std::span<const std::byte> stored, const std::string& vdi, uint32_t seq) {
  return open_frame(s, stored, manifest_aad(vdi, seq), true);
}

Bytes seal_point_list(const Sealer& s, std::span<const std::byte> encoded, const std::string& vdi, uint32_t generation) {
  return seal_in_frame(s, encoded, "L" + vdi + "/" + std::to_string(generation));
}

Bytes open_point_list(const Sealer& s, std::span<const std::byte> stored, const std::string& vdi, uint32_t generation) {
  return open_frame(s, stored, "L" + vdi + "/" + std::to_string(generation), false);
}

}  // namespace cbtfs
