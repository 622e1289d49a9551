// Records, refs, manifests and headers: round trips and hostile input.
#include <xxhash.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <nlohmann/json.hpp>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"
#include "cbtfs/size_arg.hpp"
#include "helpers.hpp"

using namespace cbtfs;
using namespace cbtfs::test;

TEST_CASE("refs round-trip through their 24-byte encoding") {
  BlockRef r{7, 1234 | BlockRef::kRawFlag, 0x123456789abcULL, 0xfedcba9876543210ULL, {}};
  std::byte buf[24];
  REQUIRE(ref_size(1) == sizeof buf);
  encode_ref(r, buf, 1);
  BlockRef back = decode_ref(buf, 1);
  CHECK(back == r);
  CHECK(back.raw());
  CHECK(back.length() == 1234);
  CHECK(std::to_integer<int>(buf[0]) == 7);  // little endian on disk
  r.pack = uint64_t{1} << 32;  // format 1 has 32-bit pack numbers
  CHECK_THROWS(encode_ref(r, buf, 1));
}

TEST_CASE("format 2 refs round-trip with a 64-bit pack and the block id") {
  IdKey key = random_id_key();
  Bytes block = random_bytes(kBlockSize, 3);
  BlockRef r{0x0123456789abcdefULL, 4321, 0x1122334455ULL, hash_bytes(block), block_id(key, block)};
  std::byte buf[48];
  REQUIRE(ref_size(2) == sizeof buf);
  encode_ref(r, buf, 2);
  CHECK(decode_ref(buf, 2) == r);
  CHECK(std::to_integer<int>(buf[0]) == 0xef);
}

TEST_CASE("block ids are keyed: same bytes, same id under one key, another under another") {
  IdKey k1 = random_id_key(), k2 = random_id_key();
  REQUIRE(k1 != k2);
  Bytes a = random_bytes(kBlockSize, 1), b = a;
  CHECK(block_id(k1, a) == block_id(k1, b));
  CHECK(block_id(k1, a) != block_id(k2, a));
  b[100] ^= std::byte{1};
  CHECK(block_id(k1, a) != block_id(k1, b));
  // HMAC-SHA-256 (RFC 4231 test case 2), first 128 bits.
  IdKey jefe{};
  std::memcpy(jefe.data(), "Jefe", 4);  // zero-padded to 32 bytes: the same HMAC key as "Jefe"
  std::string msg = "what do ya want for nothing?";
  BlockId want{0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7};
  CHECK(block_id(jefe, std::as_bytes(std::span(msg))) == want);
}

TEST_CASE("tree depth grows with the disk, not with anything else") {
  CHECK(tree_depth(1) == 1);
  CHECK(tree_depth(1024) == 1);
  CHECK(tree_depth(1025) == 2);
  CHECK(tree_depth(block_count(uint64_t{64} << 30)) == 2);  // 64 GiB
  CHECK(tree_depth(block_count(uint64_t{1} << 40)) == 3);   // 1 TiB
  CHECK(tree_depth(block_count(uint64_t{64} << 40)) == 3);
  CHECK(tree_depth(block_count((uint64_t{64} << 40) + 1)) == 4);
  CHECK(block_count(65536) == 1);
  CHECK(block_count(65537) == 2);
}

TEST_CASE("records: compressible data is LZ4, random data is stored raw, both verify") {
  for (auto data : {text_bytes(kBlockSize, 1), random_bytes(kBlockSize, 2)}) {
    BlockRef ref;
    Bytes stored = encode_record(data, ref);
    CHECK(ref.length() == stored.size());
    Bytes out(kBlockSize);
    decode_record(stored, ref, out);
    CHECK(out == data);
  }
  BlockRef ref;
  CHECK(encode_record(text_bytes(kBlockSize, 1), ref).size() < kBlockSize / 4);
  CHECK(!ref.raw());
  encode_record(random_bytes(kBlockSize, 2), ref);
  CHECK(ref.raw());
}

TEST_CASE("records: every single-byte flip is caught, never decoded to wrong data") {
  for (auto data : {text_bytes(kBlockSize, 3), random_bytes(kBlockSize, 4)}) {
    BlockRef ref;
    Bytes stored = encode_record(data, ref);
    Bytes out(kBlockSize);
    for (size_t i = 0; i < stored.size(); i += std::max<size_t>(1, stored.size() / 97)) {
      Bytes bad = stored;
      bad[i] ^= std::byte{0x20};
      CHECK_THROWS_AS(decode_record(bad, ref, out), CorruptError);
    }
    // Truncated and overlong records.
    CHECK_THROWS_AS(decode_record({stored.data(), stored.size() - 1}, ref, out), CorruptError);
    Bytes longer = stored;
    longer.push_back(std::byte{0});
    CHECK_THROWS_AS(decode_record(longer, ref, out), CorruptError);
    // A ref with the wrong checksum.
    BlockRef wrong = ref;
    wrong.hash ^= 1;
    CHECK_THROWS_AS(decode_record(stored, wrong, out), CorruptError);
  }
}

TEST_CASE("zero detection") {
  Bytes z(kBlockSize);
  CHECK(all_zero(z));
  for (size_t i : {size_t{0}, size_t{63}, size_t{64}, size_t{kBlockSize - 1}}) {
    z[i] = std::byte{1};
    CHECK(!all_zero(z));
    z[i] = std::byte{0};
  }
  CHECK(all_zero(std::span<const std::byte>(z.data(), 7)));
}

namespace {
Manifest sample_manifest() {
  Manifest m;
  m.vdi = kVdi;
  m.seq = 3;
  m.time = 1795489200;
  m.virtual_size = (uint64_t{10} << 30) + 4096;
  m.depth = tree_depth(block_count(m.virtual_size));
  m.root = BlockRef{3, 999, 4096, 42};
  m.pack = 3;
  m.chain = 1;
  m.parent = 2;
  m.vdi_name = "root disk";
  m.vm_name = "web \"1\"";
  m.snapshot_uuid = "8b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01";
  m.bytes_stored = 123456;
  m.blocks_written = 7;
  return m;
}

std::string as_text(const Bytes& b) { return std::string(reinterpret_cast<const char*>(b.data()), b.size()); }
Bytes as_bytes(const std::string& s) {
  Bytes b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

// Re-signs a JSON body the way the writer does, to forge well-formed files.
Bytes signed_json(const char* kind, const nlohmann::json& body) {
  std::string text = body.dump();
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH3_64bits(text.data(), text.size())));
  return as_bytes(nlohmann::json{{kind, body}, {"xxh3", hex}}.dump());
}
}  // namespace

TEST_CASE("manifests round-trip") {
  Manifest m = sample_manifest();
  Manifest back = decode_manifest(encode_manifest(m), "test");
  CHECK(back.vdi == m.vdi);
  CHECK(back.seq == m.seq);
  CHECK(back.time == m.time);
  CHECK(back.virtual_size == m.virtual_size);
  CHECK(back.root == m.root);
  CHECK(back.parent == 2);
  CHECK(back.vm_name == m.vm_name);
  CHECK(back.snapshot_uuid == m.snapshot_uuid);
  CHECK(back.bytes_stored == m.bytes_stored);
}

TEST_CASE("format 2 manifests round-trip with the root's id and their packs") {
  Manifest m = sample_manifest();
  m.format = 2;
  m.pack = 0;
  m.packs = {0xfedcba9876543210ULL, 7};
  m.root = BlockRef{0xfedcba9876543210ULL, 999, 4096, 42, block_id(random_id_key(), random_bytes(100, 1))};
  Manifest back = decode_manifest(encode_manifest(m), "test");
  CHECK(back.format == 2);
  CHECK(back.root == m.root);
  CHECK(back.packs == m.packs);
  auto j = nlohmann::json::parse(as_text(encode_manifest(m)));
  auto body = j["point"];
  body["root"]["id"] = "xyz";
  CHECK_THROWS_AS(decode_manifest(signed_json("point", body), "x"), FormatError);
}

TEST_CASE("names that are not UTF-8 are stored, not refused") {
  Manifest m = sample_manifest();
  m.vm_name = "bad \xff\xfe name";
  Manifest back = decode_manifest(encode_manifest(m), "test");
  CHECK(back.vm_name == "bad \xef\xbf\xbd\xef\xbf\xbd name");
}

TEST_CASE("manifests: truncation at every length and every bit flip give a clear error") {
  Bytes good = encode_manifest(sample_manifest());
  for (size_t len = 0; len + 1 < good.size(); ++len) {
    // The last byte is a newline; without it the file is still whole.
    CHECK_THROWS_AS(decode_manifest({good.data(), len}, "p"), FormatError);
  }
  size_t caught = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit : {0, 5}) {
      Bytes bad = good;
      bad[i] ^= static_cast<std::byte>(1 << bit);
      try {
        Manifest m = decode_manifest(bad, "p");
        // Only a flip in insignificant whitespace may pass, and then nothing changed.
        CHECK(m.root == sample_manifest().root);
        CHECK(m.time == sample_manifest().time);
      } catch (const FormatError& e) {
        INFO(e.what());
        CHECK(std::string(e.what()).find("p:") == 0);
        ++caught;
      }
    }
  }
  CHECK(caught > good.size());
}

TEST_CASE("manifests of a newer version are refused with a clear message") {
  auto j = nlohmann::json::parse(as_text(encode_manifest(sample_manifest())));
  auto body = j["point"];
  body["version"] = kFormatVersion + 1;
  try {
    decode_manifest(signed_json("point", body), "x.point");
    FAIL("accepted a newer version");
  } catch (const VersionError& e) {
    CHECK(std::string(e.what()).find("newer cbtfs") != std::string::npos);
  }
  body["version"] = 1;
  body["depth"] = 5;  // inconsistent with the size
  CHECK_THROWS_AS(decode_manifest(signed_json("point", body), "x"), FormatError);
  body = j["point"];
  body["vdi"] = "../../etc";
  CHECK_THROWS_AS(decode_manifest(signed_json("point", body), "x"), FormatError);
  body = j["point"];
  body.erase("root");
  CHECK_THROWS_AS(decode_manifest(signed_json("point", body), "x"), FormatError);
  body = j["point"];
  body["seq"] = "three";
  CHECK_THROWS_AS(decode_manifest(signed_json("point", body), "x"), FormatError);
}

TEST_CASE("repository header: good, damaged, newer, foreign") {
  std::string id = random_uuid();
  Bytes h = encode_repo_header(RepoHeader{id, 1, {}, false});
  CHECK(check_repo_header(h, "r").id == id);
  CHECK(check_repo_header(h, "r").format == 1);
  CHECK(check_repo_header(signed_json("repository", {{"version", 1}, {"format", "cbtfs"}}), "r").id.empty());
  RepoHeader two{id, 2, random_id_key(), false};
  CHECK(check_repo_header(encode_repo_header(two), "r").id_key == two.id_key);
  CHECK_THROWS_AS(check_repo_header(signed_json("repository", {{"version", 2}, {"format", "cbtfs"}}), "r"), FormatError);
  CHECK_THROWS_AS(check_repo_header(signed_json("repository", {{"version", 1}, {"format", "cbtfs"}, {"id", "../x"}}), "r"),
                  FormatError);
  CHECK_THROWS_AS(check_repo_header(signed_json("repository", {{"version", 1}, {"format", "cbtfs"}, {"id", 7}}), "r"),
                  FormatError);
  for (size_t i = 0; i < h.size(); i += 3) {
    Bytes bad = h;
    bad[i] ^= std::byte{0x41};
    try {
      check_repo_header(bad, "r");
    } catch (const FormatError&) {
    }
  }
  CHECK_THROWS_AS(check_repo_header(as_bytes("{}"), "r"), FormatError);
  CHECK_THROWS_AS(check_repo_header(as_bytes(""), "r"), FormatError);
  CHECK_THROWS_AS(check_repo_header(signed_json("repository", {{"version", 9}, {"format", "cbtfs"}}), "r"), VersionError);
  CHECK_THROWS_AS(check_repo_header(signed_json("repository", {{"version", 1}, {"format", "zfs"}}), "r"), FormatError);
}

TEST_CASE("pack headers") {
  Bytes h = encode_pack_header(12, 1);
  CHECK(h.size() == pack_header_size(1));
  CHECK_NOTHROW(check_pack_header(h, 12, 1, "p"));
  CHECK_THROWS_AS(check_pack_header(h, 13, 1, "p"), FormatError);
  CHECK_THROWS_AS(check_pack_header(h, 12, 2, "p"), FormatError);  // a format 1 pack where format 2 is expected
  CHECK_THROWS_AS(check_pack_header({h.data(), 8}, 12, 1, "p"), FormatError);
  h[0] = std::byte{'X'};
  CHECK_THROWS_AS(check_pack_header(h, 12, 1, "p"), FormatError);

  uint64_t big = 0xfedcba9876543210ULL;
  Bytes h2 = encode_pack_header(big, 2);
  CHECK(h2.size() == pack_header_size(2));
  CHECK_NOTHROW(check_pack_header(h2, big, 2, "p"));
  CHECK_THROWS_AS(check_pack_header(h2, big ^ 1, 2, "p"), FormatError);
  CHECK_THROWS_AS(check_pack_header(h2, big, 1, "p"), FormatError);
}

TEST_CASE("times parse in the forms people type") {
  CHECK(parse_time("2026-11-24T03:00:00Z") == 1795489200);
  CHECK(parse_time("2026-11-24T030000Z") == 1795489200);
  CHECK(parse_time("2026-11-24 03:00:00") == 1795489200);
  CHECK(parse_time("2026-11-24T04:00:00+01:00") == 1795489200);
  CHECK(parse_time("2026-11-24T03:00:00.5Z") == 1795489200);
  CHECK(parse_time("@1795489200") == 1795489200);
  CHECK(format_point_name(1795489200) == "2026-11-24T030000Z");
  CHECK(format_iso_time(1795489200) == "2026-11-24T03:00:00Z");
  for (auto bad : {"", "yesterday", "2026-13-01", "2026-11-24T25:00", "@12x", "2026-11-24T03:00:00Zjunk"})
    CHECK_THROWS_AS(parse_time(bad), UsageError);
}

TEST_CASE("uuids") {
  CHECK(is_uuid(kVdi));
  CHECK(!is_uuid("../x"));
  CHECK(!is_uuid(std::string(kVdi).substr(1)));
  CHECK(is_uuid(random_uuid()));
  CHECK(random_uuid() != random_uuid());
}

TEST_CASE("sizes on command lines: bytes or K/M/G/T/P, powers of 1024") {
  CHECK(parse_size("4096") == 4096u);
  CHECK(parse_size("512M") == 512ull << 20);
  CHECK(parse_size("4g") == 4ull << 30);
  CHECK(parse_size("4GiB") == 4ull << 30);
  CHECK(parse_size("1T") == 1ull << 40);
  CHECK(parse_size("10B") == 10u);
  CHECK_FALSE(parse_size(""));
  CHECK_FALSE(parse_size("M"));
  CHECK_FALSE(parse_size("-1"));
  CHECK_FALSE(parse_size("12X"));
  CHECK_FALSE(parse_size("1.5G"));
  CHECK_FALSE(parse_size("99999999999999999999"));
  CHECK_FALSE(parse_size("17179869184G"));  // 2^64 bytes
}
