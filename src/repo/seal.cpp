#include "cbtfs/seal.hpp"

#include <endian.h>
#include <lz4.h>
#include <gcrypt.h>
#include <openssl/rand.h>

#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "cbtfs/errors.hpp"

namespace cbtfs {

namespace {

// Records are sealed and opened with libgcrypt: on the same machine its
// AES-256-GCM opened a 26000-byte record in 6.3 us against OpenSSL 3.0's
// 8.6 us, and its AES-256-OCB in 1.7 us (libgcrypt 1.10's GHASH is the
// slow half of its GCM). A small read through the mount opens a whole
// record. Both are the standard modes: what another implementation
// sealed, these open.
void init_gcrypt() {
  static const bool done = [] {
    if (!gcry_check_version(GCRYPT_VERSION)) throw std::runtime_error("libgcrypt is older than cbtfs was built with");
    // Keys live in ordinary memory, as OpenSSL's do: a process holding one
    // is made undumpable instead (key_slots.cpp), and secure memory would
    // need privileges a mount run by a user does not have.
    gcry_control(GCRYCTL_DISABLE_SECMEM, 0);
    gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    return true;
  }();
  (void)done;
}

std::atomic<uint64_t> next_serial{1};

// Each thread keeps handles with the key schedules of the two sealers it
// served last; a seal then only sets its nonce. Two, because a copy
// between encrypted repositories opens with one key and seals with the
// other, record after record. Handles are never shared between threads.
struct KeyedHandle {
  uint64_t serial = 0;
  Cipher cipher = Cipher::aes256_gcm;
  gcry_cipher_hd_t h = nullptr;
  ~KeyedHandle() {
    if (h) gcry_cipher_close(h);
  }
};

gcry_cipher_hd_t handle_for(uint64_t serial, const DataKey& key, Cipher cipher) {
  thread_local std::array<KeyedHandle, 2> handles;
  thread_local size_t last = 0;
  for (size_t i = 0; i < handles.size(); ++i)
    if (handles[i].serial == serial) {
      last = i;
      return handles[i].h;
    }
  last = 1 - last;  // the one served longer ago
  KeyedHandle& k = handles[last];
  k.serial = 0;
  if (k.h && k.cipher != cipher) {
    gcry_cipher_close(k.h);
    k.h = nullptr;
  }
  if (!k.h) {
    init_gcrypt();
    int mode = cipher == Cipher::aes256_ocb ? GCRY_CIPHER_MODE_OCB : GCRY_CIPHER_MODE_GCM;
    if (gcry_cipher_open(&k.h, GCRY_CIPHER_AES256, mode, 0) != 0) {
      k.h = nullptr;
      throw std::runtime_error(std::string(cipher_name(cipher)) + " setup failed");
    }
    k.cipher = cipher;
  }
  if (gcry_cipher_setkey(k.h, key.data(), key.size()) != 0)
    throw std::runtime_error(std::string(cipher_name(cipher)) + " setup failed");
  k.serial = serial;
  return k.h;
}

// Starts a seal or an opening: a fresh nonce state, then the bound data.
// The whole text follows in one call, which OCB must be told is the last.
bool start(gcry_cipher_hd_t h, Cipher cipher, const std::byte* nonce, std::span<const std::byte> aad) {
  return gcry_cipher_reset(h) == 0 && gcry_cipher_setiv(h, nonce, kNonceSize) == 0 &&
         gcry_cipher_authenticate(h, aad.data(), aad.size()) == 0 &&
         (cipher != Cipher::aes256_ocb || gcry_cipher_final(h) == 0);
}

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

Sealer::Sealer(const DataKey& key, Cipher cipher) : key_(key), cipher_(cipher), serial_(next_serial++) {}

Bytes Sealer::seal(std::span<const std::byte> plain, std::span<const std::byte> aad) const {
  Bytes out(kNonceSize + plain.size() + kTagSize);
  // Random nonces: a key seals at most about 2^32 objects before a repeat
  // becomes likelier than 2^-32 (NIST SP 800-38D); at 64 KiB per record
  // that is 256 TiB stored, far past any one repository's key.
  if (RAND_bytes(u8(out.data()), kNonceSize) != 1) throw std::runtime_error("no random bytes for a nonce");
  gcry_cipher_hd_t h = handle_for(serial_, key_, cipher_);
  bool ok = start(h, cipher_, out.data(), aad) &&
            gcry_cipher_encrypt(h, out.data() + kNonceSize, plain.size(), plain.data(), plain.size()) == 0 &&
            gcry_cipher_gettag(h, out.data() + kNonceSize + plain.size(), kTagSize) == 0;
  if (!ok) throw std::runtime_error(std::string(cipher_name(cipher_)) + " sealing failed");
  return out;
}

void Sealer::open(std::span<const std::byte> sealed, std::span<const std::byte> aad, std::span<std::byte> out) const {
  if (sealed.size() < kSealOverhead || out.size() != sealed.size() - kSealOverhead)
    throw CorruptError("sealed object of impossible size");
  gcry_cipher_hd_t h = handle_for(serial_, key_, cipher_);
  bool ok = start(h, cipher_, sealed.data(), aad) &&
            gcry_cipher_decrypt(h, out.data(), out.size(), sealed.data() + kNonceSize, out.size()) == 0 &&
            gcry_cipher_checktag(h, sealed.data() + sealed.size() - kTagSize, kTagSize) == 0;
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
