// Repository formats 1 and 2: constants, the on-disk records and their
// codecs. man/cbtfs-format.5 is the prose version of this file; keep them
// together. Format 1 keeps each VDI's records in packs of its own; format 2
// keeps every record once in a block store shared by the whole repository,
// known by a keyed hash of its content (see "FORMAT 2" in the page).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cbtfs/storage.hpp"

namespace cbtfs {

inline constexpr uint32_t kFormatVersion = 2;  // the newest format this cbtfs reads and writes
inline constexpr uint32_t kBlockSize = 64 * 1024;  // CBT granularity
inline constexpr uint32_t kFanoutBits = 10;
inline constexpr uint32_t kFanout = 1u << kFanoutBits;  // refs per index node
inline constexpr std::array<char, 8> kPackMagic = {'C', 'B', 'T', 'F', 'S', 'P', 'K', '1'};
inline constexpr std::array<char, 8> kPackMagic2 = {'C', 'B', 'T', 'F', 'S', 'P', 'K', '2'};

// Bytes of one encoded reference, of an index node, of a pack header.
constexpr uint32_t ref_size(uint32_t format) { return format >= 2 ? 48 : 24; }
constexpr uint32_t node_size(uint32_t format) { return kFanout * ref_size(format); }
constexpr uint32_t pack_header_size(uint32_t format) { return format >= 2 ? 24 : 16; }

// Format 2's name of a record: HMAC-SHA-256 of its plaintext under the
// repository's id key, first 128 bits. Keyed, so neither a guest nor anyone
// without the key can make two blocks share a name.
using BlockId = std::array<uint8_t, 16>;
using IdKey = std::array<uint8_t, 32>;
BlockId block_id(const IdKey& key, std::span<const std::byte> plain);
struct BlockIdHash {
  size_t operator()(const BlockId& id) const noexcept {
    size_t h = 0;
    for (size_t i = 0; i < sizeof h; ++i) h = h << 8 | id[i];  // a keyed hash already: any bits will do
    return h;
  }
};
IdKey random_id_key();

// Where one stored record (a data block or an index node) lives.
// pack == 0 means "nothing stored": an all-zero block or an all-zero subtree.
struct BlockRef {
  uint64_t pack = 0;        // format 1: the VDI's pack number; 2: the store's pack id
  uint32_t stored_len = 0;  // bytes in the pack; bit 31 set: stored uncompressed
  uint64_t offset = 0;      // byte offset in the pack
  uint64_t hash = 0;        // XXH3-64 of the uncompressed record, checked on every read
  BlockId id{};             // format 2 only: block_id() of the uncompressed record
  // Format 2: stored_check() of the bytes as stored (sealed, in an
  // encrypted repository), so that what is stored can be checked without
  // the key; 0 in references written before it existed.
  uint32_t stored_check = 0;

  static constexpr uint32_t kRawFlag = 0x80000000u;
  bool is_zero() const { return pack == 0; }
  bool raw() const { return stored_len & kRawFlag; }
  uint32_t length() const { return stored_len & ~kRawFlag; }
  bool operator==(const BlockRef&) const = default;
};

void encode_ref(const BlockRef& r, std::byte* out, uint32_t format);
BlockRef decode_ref(const std::byte* in, uint32_t format);

// An index node as stored: kFanout refs, in block order. A ref at level 0
// is a data block; one at level L > 0 is a node whose entries are refs at
// level L - 1, each covering blocks_under(L - 1) blocks.
class IndexNode {
 public:
  IndexNode(std::span<const std::byte> bytes, uint32_t format) : bytes_(bytes), format_(format) {}
  BlockRef operator[](uint64_t entry) const { return decode_ref(bytes_.data() + entry * ref_size(format_), format_); }

 private:
  std::span<const std::byte> bytes_;
  uint32_t format_;
};
Bytes encode_node(std::span<const BlockRef> entries, uint32_t format);  // entries.size() == kFanout
// Blocks a ref at `level` covers.
inline uint64_t blocks_under(uint32_t level) { return uint64_t{1} << (kFanoutBits * level); }
// Which entry of the node at `level` (>= 1) on block's path leads to it.
inline uint64_t entry_of(uint64_t block, uint32_t level) {
  return (block >> (kFanoutBits * (level - 1))) & (kFanout - 1);
}

// Depth of the index tree for a disk of n blocks: 1 when one node covers it.
uint32_t tree_depth(uint64_t nblocks);
uint64_t block_count(uint64_t virtual_size);

// What a pack header holds: magic, format version, pack id.
Bytes encode_pack_header(uint64_t pack, uint32_t format);
void check_pack_header(std::span<const std::byte> header, uint64_t pack, uint32_t format, const std::string& where);

// LZ4 + XXH3 codec for one record. encode returns the bytes to store and
// fills ref.stored_len/hash (pack/offset are the caller's).
Bytes encode_record(std::span<const std::byte> plain, BlockRef& ref);
// The same with the hash already computed by the caller.
Bytes encode_record(std::span<const std::byte> plain, BlockRef& ref, uint64_t hash);
// The same, reusing plain's buffer when the record is stored raw.
// compress=false stores the block raw without trying LZ4 (a run of
// incompressible data, see PointWriter).
Bytes encode_record(Bytes&& plain, BlockRef& ref, uint64_t hash, bool compress = true);
// Verifies the checksum and decompresses into out (whose size is the
// record's uncompressed size). Throws CorruptError, never returns bad data.
void decode_record(std::span<const std::byte> stored, const BlockRef& ref, std::span<std::byte> out);
// Whether a stored record holds exactly plain (no checksum needed: equal
// bytes are the proof). scratch holds a decompressed record meanwhile.
bool record_equals(std::span<const std::byte> stored, const BlockRef& ref, std::span<const std::byte> plain,
                   Bytes& scratch);
uint64_t hash_bytes(std::span<const std::byte> data);
// Lower-case hexadecimal of n bytes.
std::string to_hex(const void* data, size_t n);
// The low 32 bits of XXH3-64 of a record as stored, never 0 (0 says "not
// recorded"): a check of the stored bytes that needs no key.
uint32_t stored_check(std::span<const std::byte> stored);
// The same, from hash_bytes() of the stored bytes when it is known already.
uint32_t stored_check_of_hash(uint64_t hash);
bool all_zero(std::span<const std::byte> data);

// What a point writer learns from a block's bytes alone. Computing it is most of
// the cost of taking a block (a keyed SHA-256 on format 2) and needs nothing
// of the writer's state, so a caller reading with several threads computes
// it on them and the writer's one thread only looks it up.
struct BlockDigest {
  bool zero = false;
  uint64_t hash = 0;  // XXH3-64, unless zero
  BlockId id{};       // format 2, unless zero
};

// One point in time of one VDI: the manifest file points/<seq>.point.
struct Manifest {
  uint32_t format = 1;  // of the repository it belongs to; it decides how refs are encoded
  std::string vdi;  // uuid
  uint32_t seq = 0;
  int64_t time = 0;  // seconds since the epoch, UTC
  uint64_t virtual_size = 0;
  uint32_t depth = 1;
  BlockRef root;
  uint32_t pack = 0;    // format 1: pack this point created (0: none, nothing changed)
  std::vector<uint64_t> packs;  // format 2: packs of the store this point created
  uint32_t chain = 0;   // seq of the full base this point's chain started at
  uint32_t parent = 0;  // previous point it is a delta of (0: a full base)
  std::string chain_reason;  // why a new chain started, for ls
  std::string vdi_name, vm_name, vm_uuid, snapshot_uuid;
  uint64_t blocks_written = 0;  // data records this point stored
  uint64_t bytes_stored = 0;    // bytes of its pack, records and nodes
  // Blocks of the image that hold data (not zero), counted at commit so that
  // stat can tell st_blocks without walking the index; unset in manifests
  // written before the count existed.
  std::optional<uint64_t> blocks_allocated;
};

Bytes encode_manifest(const Manifest& m);
// Throws FormatError (VersionError for a newer format) naming `where`.
Manifest decode_manifest(std::span<const std::byte> data, const std::string& where);

// The AEAD an encrypted repository seals with (the header's "cipher").
// Repositories made before OCB was offered are GCM.
enum class Cipher : uint8_t { aes256_gcm, aes256_ocb };
const char* cipher_name(Cipher c);  // "aes-256-gcm", "aes-256-ocb"
std::optional<Cipher> parse_cipher(const std::string& name);

// The repository header file "cbtfs-repository".
// The header names the repository with a uuid, so that two repositories
// backing up the same disk can tell their host-side snapshots apart.
// Format 2's header also holds the id key of block_id(), in the clear
// unless the repository is encrypted: then only its key slots (objects of
// their own, key_slots.hpp) hold it, sealed.
struct RepoHeader {
  std::string id;  // "" for a header written before ids existed
  uint32_t format = 1;
  IdKey id_key{};  // format 2; in an encrypted repository, known once a slot is opened
  bool encrypted = false;
  Cipher cipher = Cipher::aes256_gcm;  // when encrypted
};
Bytes encode_repo_header(const RepoHeader& h);
RepoHeader check_repo_header(std::span<const std::byte> data, const std::string& where);

// "2026-11-24T030000Z" and back; both throw UsageError on nonsense.
std::string format_point_name(int64_t t);
int64_t parse_time(const std::string& iso8601);
std::string format_iso_time(int64_t t);
bool is_uuid(const std::string& s);
std::string random_uuid();

}  // namespace cbtfs
