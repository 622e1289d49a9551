// Encoding and decoding of every repository record. Every decoder treats its
// input as hostile: it checks lengths, magic, version and checksum before it
// believes a field, and throws FormatError with the file name on any doubt.
#include "cbtfs/format.hpp"

#include <lz4.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <xxhash.h>

#include <cstring>
#include <memory>
#include <ctime>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "cbtfs/errors.hpp"

namespace cbtfs {

using nlohmann::json;

namespace {

template <typename T>
void put_le(std::byte* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}

template <typename T>
T get_le(const std::byte* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(std::to_integer<uint8_t>(p[i])) << (8 * i);
  return v;
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t parse_hex64(const std::string& s) {
  if (s.size() != 16 || s.find_first_not_of("0123456789abcdef") != std::string::npos)
    throw FormatError("bad checksum field '" + s + "'");
  return std::stoull(s, nullptr, 16);
}

template <size_t N>
std::string hex_bytes(const std::array<uint8_t, N>& a) {
  return to_hex(a.data(), a.size());
}

template <size_t N>
std::array<uint8_t, N> parse_hex_bytes(const std::string& s, const char* what) {
  std::array<uint8_t, N> a{};
  if (s.size() != 2 * N || s.find_first_not_of("0123456789abcdef") != std::string::npos)
    throw FormatError(std::string("bad ") + what + " field");
  for (size_t i = 0; i < N; ++i) a[i] = static_cast<uint8_t>(std::stoul(s.substr(2 * i, 2), nullptr, 16));
  return a;
}

json ref_to_json(const BlockRef& r, uint32_t format) {
  json j{{"pack", r.pack}, {"stored_len", r.stored_len}, {"offset", r.offset}, {"hash", hex64(r.hash)}};
  if (format >= 2) j["id"] = hex_bytes(r.id);
  if (format >= 2 && r.stored_check) j["stored_check"] = r.stored_check;
  return j;
}

BlockRef ref_from_json(const json& j, uint32_t format) {
  BlockRef r;
  r.pack = format >= 2 ? j.at("pack").get<uint64_t>() : j.at("pack").get<uint32_t>();
  r.stored_len = j.at("stored_len").get<uint32_t>();
  r.offset = j.at("offset").get<uint64_t>();
  r.hash = parse_hex64(j.at("hash").get<std::string>());
  if (format >= 2) r.id = parse_hex_bytes<16>(j.at("id").get<std::string>(), "block id");
  if (format >= 2) r.stored_check = j.value("stored_check", uint32_t{0});
  return r;
}

// Names come from users and hypervisors; invalid UTF-8 becomes U+FFFD
// instead of an error, identically when signing and when checking.
std::string canonical(const json& j, int indent = -1) {
  return j.dump(indent, ' ', false, json::error_handler_t::replace);
}

// Signed JSON: {"<kind>": {...}, "xxh3": hex(XXH3(dump of the object))}.
// nlohmann's dump is deterministic (keys sorted), so the check is exact.
Bytes sign(const char* kind, const json& body) {
  std::string text = canonical(body);
  json outer{{kind, body}, {"xxh3", hex64(XXH3_64bits(text.data(), text.size()))}};
  std::string s = canonical(outer, 1) + "\n";
  Bytes out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

json verify(const char* kind, std::span<const std::byte> data, const std::string& where) {
  json outer = json::parse(reinterpret_cast<const char*>(data.data()),
                           reinterpret_cast<const char*>(data.data()) + data.size(), nullptr, false);
  if (outer.is_discarded() || !outer.is_object() || !outer.contains(kind) || !outer.contains("xxh3"))
    throw FormatError(where + ": not a cbtfs " + kind + " file (truncated or damaged)");
  const json& body = outer[kind];
  std::string text = canonical(body);
  const json& sum = outer["xxh3"];
  if (!sum.is_string() || sum.get<std::string>() != hex64(XXH3_64bits(text.data(), text.size())))
    throw FormatError(where + ": checksum mismatch (the file is damaged)");
  if (!body.is_object() || !body.contains("version") || !body["version"].is_number_unsigned())
    throw FormatError(where + ": no format version");
  auto v = body["version"].get<uint64_t>();
  if (v > kFormatVersion)
    throw VersionError(where + ": written by a newer cbtfs (format version " + std::to_string(v) +
                       ", this cbtfs reads up to " + std::to_string(kFormatVersion) + "); upgrade cbtfs");
  if (v == 0) throw FormatError(where + ": invalid format version 0");
  return body;
}

}  // namespace

// Format 1: pack u32, stored_len u32, offset u64, hash u64.
// Format 2: pack u64, offset u64, stored_len u32, stored_check u32, hash u64, id[16].
void encode_ref(const BlockRef& r, std::byte* out, uint32_t format) {
  if (format < 2) {
    if (r.pack > UINT32_MAX) throw std::logic_error("format 1 pack number out of range");
    put_le<uint32_t>(out, static_cast<uint32_t>(r.pack));
    put_le<uint32_t>(out + 4, r.stored_len);
    put_le<uint64_t>(out + 8, r.offset);
    put_le<uint64_t>(out + 16, r.hash);
    return;
  }
  put_le<uint64_t>(out, r.pack);
  put_le<uint64_t>(out + 8, r.offset);
  put_le<uint32_t>(out + 16, r.stored_len);
  put_le<uint32_t>(out + 20, r.stored_check);
  put_le<uint64_t>(out + 24, r.hash);
  std::memcpy(out + 32, r.id.data(), r.id.size());
}

BlockRef decode_ref(const std::byte* in, uint32_t format) {
  if (format < 2)
    return BlockRef{get_le<uint32_t>(in), get_le<uint32_t>(in + 4), get_le<uint64_t>(in + 8), get_le<uint64_t>(in + 16), {}};
  BlockRef r{get_le<uint64_t>(in), get_le<uint32_t>(in + 16), get_le<uint64_t>(in + 8), get_le<uint64_t>(in + 24), {}};
  std::memcpy(r.id.data(), in + 32, r.id.size());
  r.stored_check = get_le<uint32_t>(in + 20);
  return r;
}

BlockId block_id(const IdKey& key, std::span<const std::byte> plain) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(plain.data()),
            plain.size(), mac, &len) ||
      len < 16)
    throw std::runtime_error("HMAC-SHA-256 failed");
  BlockId id;
  std::memcpy(id.data(), mac, id.size());
  return id;
}

IdKey random_id_key() {
  IdKey k;
  if (RAND_bytes(k.data(), static_cast<int>(k.size())) != 1) throw std::runtime_error("no random bytes for a key");
  return k;
}

uint64_t block_count(uint64_t virtual_size) { return (virtual_size + kBlockSize - 1) / kBlockSize; }

Bytes encode_node(std::span<const BlockRef> entries, uint32_t format) {
  Bytes node(node_size(format));
  for (size_t i = 0; i < entries.size() && i < kFanout; ++i) encode_ref(entries[i], node.data() + i * ref_size(format), format);
  return node;
}

uint32_t tree_depth(uint64_t nblocks) {
  uint32_t depth = 1;
  for (uint64_t cover = kFanout; cover < nblocks; cover *= kFanout) ++depth;
  return depth;
}

// Format 1: magic "CBTFSPK1", version u32, pack u32.
// Format 2: magic "CBTFSPK2", version u32, 0 u32, pack u64.
Bytes encode_pack_header(uint64_t pack, uint32_t format) {
  Bytes h(pack_header_size(format));
  const auto& magic = format >= 2 ? kPackMagic2 : kPackMagic;
  std::memcpy(h.data(), magic.data(), magic.size());
  put_le<uint32_t>(h.data() + 8, format);
  if (format >= 2) {
    put_le<uint64_t>(h.data() + 16, pack);
  } else {
    if (pack > UINT32_MAX) throw std::logic_error("format 1 pack number out of range");
    put_le<uint32_t>(h.data() + 12, static_cast<uint32_t>(pack));
  }
  return h;
}

void check_pack_header(std::span<const std::byte> h, uint64_t pack, uint32_t format, const std::string& where) {
  const auto& magic = format >= 2 ? kPackMagic2 : kPackMagic;
  if (h.size() < pack_header_size(format) || std::memcmp(h.data(), magic.data(), magic.size()) != 0)
    throw FormatError(where + ": not a cbtfs pack file of format " + std::to_string(format));
  auto v = get_le<uint32_t>(h.data() + 8);
  if (v > kFormatVersion) throw VersionError(where + ": pack of a newer format version " + std::to_string(v));
  uint64_t named = format >= 2 ? get_le<uint64_t>(h.data() + 16) : get_le<uint32_t>(h.data() + 12);
  if (named != pack) throw FormatError(where + ": pack id does not match its name");
}

uint64_t hash_bytes(std::span<const std::byte> d) { return XXH3_64bits(d.data(), d.size()); }

std::string to_hex(const void* data, size_t n) {
  static const char* digits = "0123456789abcdef";
  auto* p = static_cast<const uint8_t*>(data);
  std::string s;
  s.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    s += digits[p[i] >> 4];
    s += digits[p[i] & 15];
  }
  return s;
}

uint32_t stored_check(std::span<const std::byte> stored) { return stored_check_of_hash(hash_bytes(stored)); }

uint32_t stored_check_of_hash(uint64_t hash) {
  auto c = static_cast<uint32_t>(hash);
  return c ? c : 1;
}

bool all_zero(std::span<const std::byte> d) {
  // Word-at-a-time compare; blocks are 64 KiB-aligned buffers.
  const std::byte* p = d.data();
  size_t n = d.size();
  uint64_t acc = 0;
  while (n >= 64) {
    uint64_t w[8];
    std::memcpy(w, p, 64);
    acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
    if (acc) return false;
    p += 64;
    n -= 64;
  }
  while (n--) acc |= std::to_integer<uint8_t>(*p++);
  return acc == 0;
}

Bytes encode_record(std::span<const std::byte> plain, BlockRef& ref) {
  return encode_record(plain, ref, hash_bytes(plain));
}

Bytes encode_record(std::span<const std::byte> plain, BlockRef& ref, uint64_t hash) {
  return encode_record(Bytes(plain.begin(), plain.end()), ref, hash);
}

Bytes encode_record(Bytes&& plain, BlockRef& ref, uint64_t hash, bool compress) {
  ref.hash = hash;
  if (compress) {
    // Compressed into scratch space that needs no zeroing; only the result
    // is copied out.
    // The LZ4 stream is reused too: a fast reset skips clearing its 16 KiB
    // table for every block, and with a reset before each block no block
    // refers to another (each decodes with LZ4_decompress_safe alone).
    thread_local std::unique_ptr<char[]> scratch;
    thread_local int scratch_size = 0;
    thread_local std::unique_ptr<LZ4_stream_t, int (*)(LZ4_stream_t*)> stream(LZ4_createStream(), LZ4_freeStream);
    int bound = LZ4_compressBound(static_cast<int>(plain.size()));
    if (scratch_size < bound) {
      scratch.reset(new char[static_cast<size_t>(bound)]);
      scratch_size = bound;
    }
    if (!stream) throw std::bad_alloc();
    LZ4_resetStream_fast(stream.get());
    int n = LZ4_compress_fast_continue(stream.get(), reinterpret_cast<const char*>(plain.data()), scratch.get(),
                                       static_cast<int>(plain.size()), bound, 1);
    if (n > 0 && static_cast<size_t>(n) < plain.size()) {
      ref.stored_len = static_cast<uint32_t>(n);
      auto* p = reinterpret_cast<const std::byte*>(scratch.get());
      return Bytes(p, p + n);
    }
  }
  // Incompressible, or not tried: stored raw, reads are then a plain copy.
  ref.stored_len = static_cast<uint32_t>(plain.size()) | BlockRef::kRawFlag;
  return std::move(plain);
}

void decode_record(std::span<const std::byte> stored, const BlockRef& ref, std::span<std::byte> out) {
  if (stored.size() != ref.length()) throw CorruptError("record length mismatch");
  if (ref.raw()) {
    if (stored.size() != out.size()) throw CorruptError("raw record has the wrong size");
    if (stored.data() != out.data()) std::memcpy(out.data(), stored.data(), out.size());
  } else {
    int n = LZ4_decompress_safe(reinterpret_cast<const char*>(stored.data()), reinterpret_cast<char*>(out.data()),
                                static_cast<int>(stored.size()), static_cast<int>(out.size()));
    if (n != static_cast<int>(out.size())) throw CorruptError("record does not decompress");
  }
  if (hash_bytes(out) != ref.hash) throw CorruptError("checksum mismatch");
}

bool record_equals(std::span<const std::byte> stored, const BlockRef& ref, std::span<const std::byte> plain,
                   Bytes& scratch) {
  if (stored.size() != ref.length()) return false;
  if (ref.raw()) return stored.size() == plain.size() && std::memcmp(stored.data(), plain.data(), plain.size()) == 0;
  scratch.resize(plain.size());
  int n = LZ4_decompress_safe(reinterpret_cast<const char*>(stored.data()), reinterpret_cast<char*>(scratch.data()),
                              static_cast<int>(stored.size()), static_cast<int>(scratch.size()));
  return n == static_cast<int>(plain.size()) && std::memcmp(scratch.data(), plain.data(), plain.size()) == 0;
}

Bytes encode_manifest(const Manifest& m) {
  json body{{"version", m.format},
            {"vdi", m.vdi},
            {"seq", m.seq},
            {"time", format_iso_time(m.time)},
            {"virtual_size", m.virtual_size},
            {"block_size", kBlockSize},
            {"fanout", kFanout},
            {"depth", m.depth},
            {"root", ref_to_json(m.root, m.format)},
            {"chain", m.chain},
            {"parent", m.parent},
            {"chain_reason", m.chain_reason},
            {"vdi_name", m.vdi_name},
            {"vm_name", m.vm_name},
            {"vm_uuid", m.vm_uuid},
            {"snapshot_uuid", m.snapshot_uuid},
            {"blocks_written", m.blocks_written},
            {"bytes_stored", m.bytes_stored}};
  if (m.blocks_allocated) body["blocks_allocated"] = *m.blocks_allocated;
  if (m.format >= 2)
    body["packs"] = m.packs;
  else
    body["pack"] = m.pack;
  return sign("point", body);
}

Manifest decode_manifest(std::span<const std::byte> data, const std::string& where) {
  json b = verify("point", data, where);
  try {
    Manifest m;
    m.format = b.at("version").get<uint32_t>();
    if (b.at("block_size").get<uint32_t>() != kBlockSize || b.at("fanout").get<uint32_t>() != kFanout)
      throw FormatError("unsupported block size or fan-out");
    m.vdi = b.at("vdi").get<std::string>();
    m.seq = b.at("seq").get<uint32_t>();
    m.time = parse_time(b.at("time").get<std::string>());
    m.virtual_size = b.at("virtual_size").get<uint64_t>();
    m.depth = b.at("depth").get<uint32_t>();
    m.root = ref_from_json(b.at("root"), m.format);
    if (m.format >= 2)
      m.packs = b.at("packs").get<std::vector<uint64_t>>();
    else
      m.pack = b.at("pack").get<uint32_t>();
    m.chain = b.at("chain").get<uint32_t>();
    m.parent = b.at("parent").get<uint32_t>();
    m.chain_reason = b.value("chain_reason", "");
    m.vdi_name = b.value("vdi_name", "");
    m.vm_name = b.value("vm_name", "");
    m.vm_uuid = b.value("vm_uuid", "");
    m.snapshot_uuid = b.value("snapshot_uuid", "");
    m.blocks_written = b.value("blocks_written", uint64_t{0});
    m.bytes_stored = b.value("bytes_stored", uint64_t{0});
    if (b.contains("blocks_allocated")) m.blocks_allocated = b.at("blocks_allocated").get<uint64_t>();
    if (!is_uuid(m.vdi)) throw FormatError("bad VDI uuid");
    if (m.seq == 0 || m.depth != tree_depth(block_count(m.virtual_size)) || m.depth > 6)
      throw FormatError("inconsistent sequence number, size or depth");
    if (m.virtual_size > (uint64_t{1} << 50)) throw FormatError("virtual size out of range");
    if (m.blocks_allocated > block_count(m.virtual_size)) throw FormatError("more allocated blocks than the disk has");
    return m;
  } catch (const json::exception& e) {
    throw FormatError(where + ": malformed point manifest: " + e.what());
  } catch (const UsageError& e) {
    throw FormatError(where + ": malformed point manifest: " + e.what());
  } catch (const FormatError& e) {
    throw FormatError(where + ": " + e.what());
  }
}

const char* cipher_name(Cipher c) { return c == Cipher::aes256_ocb ? "aes-256-ocb" : "aes-256-gcm"; }

std::optional<Cipher> parse_cipher(const std::string& name) {
  if (name == "aes-256-gcm") return Cipher::aes256_gcm;
  if (name == "aes-256-ocb") return Cipher::aes256_ocb;
  return std::nullopt;
}

Bytes encode_repo_header(const RepoHeader& h) {
  json body{{"version", h.format}, {"format", "cbtfs"}, {"block_size", kBlockSize}, {"id", h.id}};
  if (h.encrypted)
    body["encryption"] = {{"cipher", cipher_name(h.cipher)}};
  else if (h.format >= 2)
    body["id_key"] = hex_bytes(h.id_key);
  return sign("repository", body);
}

RepoHeader check_repo_header(std::span<const std::byte> data, const std::string& where) {
  json b = verify("repository", data, where);
  if (b.value("format", "") != "cbtfs") throw FormatError(where + ": not a cbtfs repository");
  try {
    RepoHeader h;
    h.format = b.at("version").get<uint32_t>();
    h.id = b.value("id", "");
    if (!h.id.empty() && !is_uuid(h.id)) throw FormatError("malformed repository id");
    if (b.contains("encryption")) {
      std::string name = b.at("encryption").at("cipher").get<std::string>();
      auto cipher = parse_cipher(name);
      if (!cipher) throw VersionError("encrypted with " + name + ", which this cbtfs does not know; upgrade cbtfs");
      h.cipher = *cipher;
      if (h.format < 2) throw FormatError("an encrypted repository of format 1");
      h.encrypted = true;
    } else if (h.format >= 2) {
      h.id_key = parse_hex_bytes<32>(b.at("id_key").get<std::string>(), "id key");
    }
    return h;
  } catch (const json::exception&) {
    throw FormatError(where + ": malformed repository header");
  } catch (const VersionError& e) {  // a newer cbtfs's repository, not a damaged one
    throw VersionError(where + ": " + e.what());
  } catch (const FormatError& e) {
    throw FormatError(where + ": " + e.what());
  }
}

std::string format_point_name(int64_t t) {
  std::time_t tt = t;
  std::tm tm{};
  if (!gmtime_r(&tt, &tm)) throw UsageError("time out of range");
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H%M%SZ", &tm);
  return buf;
}

std::string format_iso_time(int64_t t) {
  std::time_t tt = t;
  std::tm tm{};
  if (!gmtime_r(&tt, &tm)) throw UsageError("time out of range");
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Accepts 2026-11-24T03:00:00Z, 2026-11-24T030000Z, 2026-11-24 03:00:00,
// an optional fraction and +HH:MM / -HHMM offsets, or "@<epoch seconds>".
int64_t parse_time(const std::string& s) {
  if (!s.empty() && s[0] == '@') {
    try {
      size_t pos = 0;
      long long v = std::stoll(s.substr(1), &pos);
      if (pos + 1 == s.size()) return v;
    } catch (const std::exception&) {
    }
    throw UsageError("bad time '" + s + "'");
  }
  static const std::regex re(
      R"(^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):?(\d{2})(?::?(\d{2})(?:\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$)");
  std::smatch m;
  if (!std::regex_match(s, m, re)) throw UsageError("bad time '" + s + "' (want ISO 8601, e.g. 2026-11-24T03:00:00Z)");
  std::tm tm{};
  tm.tm_year = std::stoi(m[1]) - 1900;
  tm.tm_mon = std::stoi(m[2]) - 1;
  tm.tm_mday = std::stoi(m[3]);
  tm.tm_hour = m[4].matched ? std::stoi(m[4]) : 0;
  tm.tm_min = m[5].matched ? std::stoi(m[5]) : 0;
  tm.tm_sec = m[6].matched ? std::stoi(m[6]) : 0;
  if (tm.tm_mon > 11 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60)
    throw UsageError("bad time '" + s + "'");
  int64_t t = timegm(&tm);
  if (m[7].matched && m[7].str() != "Z") {
    std::string off = m[7].str();
    int sign = off[0] == '-' ? -1 : 1;
    std::string digits;
    for (char c : off.substr(1))
      if (c != ':') digits += c;
    t -= sign * (std::stoi(digits.substr(0, 2)) * 3600 + std::stoi(digits.substr(2, 2)) * 60);
  }
  return t;
}

bool is_uuid(const std::string& s) {
  static const std::regex re("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$");
  return std::regex_match(s, re);
}

std::string random_uuid() {
  std::random_device rd;
  std::array<uint8_t, 16> b;
  for (auto& x : b) x = static_cast<uint8_t>(rd());
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  char buf[37];
  std::snprintf(buf, sizeof buf, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return buf;
}

}  // namespace cbtfs
