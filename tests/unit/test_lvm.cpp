// LVM2 metadata from hostile disks: PVs built byte by byte the way lvm2
// writes them (label, PV header, metadata area header, text in a circular
// buffer), then broken on purpose. And the mount view: an LV on a PV in a
// partition reads through the partition's offset.
#include <catch2/catch.hpp>
#include <cstring>
#include <set>

#include "helpers.hpp"
#include "mount/lvm.hpp"
#include "mount/mount_view.hpp"

using namespace cbtfs;
using namespace cbtfs::lvm;

namespace {

constexpr uint64_t kMib = 1 << 20;
constexpr uint64_t kMdaStart = 4096, kMdaSize = kMib - 4096;
constexpr uint64_t kPeStart = kMib;  // 2048 sectors, as pvcreate puts it
constexpr uint64_t kExtent = kMib;   // extent_size = 2048 sectors

void put32(std::vector<std::byte>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}
void put64(std::vector<std::byte>& b, size_t at, uint64_t v) {
  put32(b, at, static_cast<uint32_t>(v));
  put32(b, at + 4, static_cast<uint32_t>(v >> 32));
}
void put_str(std::vector<std::byte>& b, size_t at, const std::string& s) {
  std::memcpy(b.data() + at, s.data(), s.size());
}

// A PV on a device of `size` bytes with one metadata area at 4 KiB.
struct Pv {
  std::vector<std::byte> dev;
  std::string uuid;  // 32 chars
  Pv(uint64_t size, std::string u) : dev(size), uuid(std::move(u)) {
    size_t l = 512;  // sector 1, as pvcreate writes it
    put_str(dev, l, "LABELONE");
    put64(dev, l + 8, 1);
    put32(dev, l + 20, 32);
    put_str(dev, l + 24, "LVM2 001");
    put_str(dev, l + 32, uuid);
    put64(dev, l + 64, size);
    put64(dev, l + 72, kPeStart);  // data area
    put64(dev, l + 104, kMdaStart);  // after the terminator: the metadata area
    put64(dev, l + 112, kMdaSize);
    seal_label();
    put32(dev, kMdaStart + 4, 0);
    put_str(dev, kMdaStart + 4, " LVM2 x[5A%r0N*>");
    put32(dev, kMdaStart + 20, 1);
    put64(dev, kMdaStart + 24, kMdaStart);
    put64(dev, kMdaStart + 32, kMdaSize);
    seal_header();
  }
  void seal_label() { put32(dev, 512 + 16, crc(kInitialCrc, std::span(dev).subspan(512 + 20, 492))); }
  void seal_header() { put32(dev, kMdaStart, crc(kInitialCrc, std::span(dev).subspan(kMdaStart + 4, 508))); }
  // Writes text (and its NUL) at offset `at` of the metadata area, wrapping
  // past its end to just after the header; returns its size.
  uint64_t put_text(uint64_t at, const std::string& text) {
    std::string t = text + '\0';
    for (size_t i = 0; i < t.size(); ++i) {
      uint64_t o = at + i;
      if (o >= kMdaSize) o = 512 + (o - kMdaSize);
      dev[kMdaStart + o] = static_cast<std::byte>(t[i]);
    }
    return t.size();
  }
  // Makes the copy at `at` the committed one; its checksum from the text
  // unless one is given.
  void commit(uint64_t at, const std::string& text, std::optional<uint32_t> sum = std::nullopt) {
    uint64_t n = put_text(at, text);
    std::string t = text + '\0';
    put64(dev, kMdaStart + 40, at);
    put64(dev, kMdaStart + 48, n);
    put32(dev, kMdaStart + 56, sum.value_or(crc(kInitialCrc, std::as_bytes(std::span(t)))));
    seal_header();
  }
  Device device() const {
    return {[this](uint64_t off, std::span<std::byte> out) {
              REQUIRE(off + out.size() <= dev.size());
              std::memcpy(out.data(), dev.data() + off, out.size());
            },
            dev.size()};
  }
};

const std::string kUuid0 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA0";
const std::string kUuid1 = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB1";
std::string dashed(const std::string& u) {
  return u.substr(0, 6) + "-" + u.substr(6, 4) + "-" + u.substr(10, 4) + "-" + u.substr(14, 4) + "-" +
         u.substr(18, 4) + "-" + u.substr(22, 4) + "-" + u.substr(26, 6);
}

std::string pv_text(const std::string& name, const std::string& uuid, uint64_t pe_count) {
  return name + " {\nid = \"" + dashed(uuid) + "\"\ndevice = \"/dev/sda2\"\nstatus = [\"ALLOCATABLE\"]\nflags = []\n" +
         "dev_size = 999\npe_start = 2048\npe_count = " + std::to_string(pe_count) + "\n}\n";
}
std::string segment(int n, uint64_t start, uint64_t count, const std::string& stripes, int stripe_count = 1,
                    uint64_t stripe_size = 0, const std::string& type = "striped") {
  std::string s = "segment" + std::to_string(n) + " {\nstart_extent = " + std::to_string(start) +
                  "\nextent_count = " + std::to_string(count) + "\n\ntype = \"" + type + "\"\nstripe_count = " +
                  std::to_string(stripe_count) + "\t# linear\n";
  if (stripe_size) s += "stripe_size = " + std::to_string(stripe_size) + "\n";
  return s + "\nstripes = [\n" + stripes + "\n]\n}\n";
}
std::string lv_text(const std::string& name, const std::string& segments, bool visible = true) {
  return name + " {\nid = \"lvuuid-" + name + "\"\nstatus = [\"READ\", \"WRITE\"" + (visible ? ", \"VISIBLE\"" : "") +
         "]\nflags = []\ncreation_time = 1795997410\t# 2026-11-30\ncreation_host = \"vm\"\nsegment_count = 1\n\n" +
         segments + "}\n";
}
std::string vg_text(uint64_t seqno, const std::string& pvs, const std::string& lvs, const std::string& name = "debian-vg") {
  return name + " {\nid = \"Dlh7cr-G0Qw-I3VK-homz-qs3D-fQBD-Xhdx5A\"\nseqno = " + std::to_string(seqno) +
         "\nformat = \"lvm2\"\nstatus = [\"RESIZEABLE\", \"READ\", \"WRITE\"]\nflags = []\nextent_size = 2048\n" +
         "max_lv = 0\nmax_pv = 0\nmetadata_copies = 0\n\nphysical_volumes {\n\n" + pvs + "}\n\nlogical_volumes {\n\n" +
         lvs + "}\n\n}\n# Generated by LVM2 version 2.03.16(2) (2022-05-18): Mon Nov 30 00:10:12 2026\n\n" +
         "contents = \"Text Format Volume Group\"\nversion = 1\n\ndescription = \"\"\n\ncreation_host = \"vm\"\t# Linux\n" +
         "creation_time = 1795997412\t# Mon Nov 30 00:10:12 2026\n";
}

// root: extents 0-1 at pe 0-1, then (after home took pe 2) extent 2 at pe 3.
std::string two_segment_lvs() {
  return lv_text("root", segment(1, 0, 2, "\"pv0\", 0") + segment(2, 2, 1, "\"pv0\", 3")) +
         lv_text("home", segment(1, 0, 1, "\"pv0\", 2"));
}

const LogicalVolume* find_lv(const VolumeGroup& vg, const std::string& name) {
  for (auto& lv : vg.lvs)
    if (lv.name == name) return &lv;
  return nullptr;
}
std::string reason(const VolumeGroup& vg, const std::string& name) {
  for (auto& s : vg.skipped)
    if (s.lv == name) return s.reason;
  return "";
}

Scan scan_one(const Pv& pv) { return find_volume_groups({pv.device()}); }

}  // namespace

TEST_CASE("lvm: the CRC is CRC-32 with LVM's initial value and no final inversion") {
  std::string s = "123456789";
  CHECK((crc(0xffffffff, std::as_bytes(std::span(s))) ^ 0xffffffff) == 0xcbf43926);
  CHECK(crc(kInitialCrc, {}) == kInitialCrc);
}

TEST_CASE("lvm: an LV extended after another one maps through both of its segments") {
  Pv pv(8 * kMib, kUuid0);
  pv.commit(512, vg_text(3, pv_text("pv0", kUuid0, 7), two_segment_lvs()));
  auto scan = scan_one(pv);
  REQUIRE(scan.groups.size() == 1);
  auto& vg = scan.groups[0];
  CHECK(vg.name == "debian-vg");
  CHECK(vg.seqno == 3);
  CHECK_FALSE(vg.recovered);
  CHECK(vg.extent_size == kExtent);
  REQUIRE(vg.lvs.size() == 2);
  auto* root = find_lv(vg, "root");
  REQUIRE(root);
  CHECK(root->size == 3 * kExtent);
  CHECK(root->uuid == "lvuuid-root");
  CHECK(describe_segments(vg, *root) == "0+2:pv0@0 2+1:pv0@3");
  // A read across the boundary: the end of pe 1, then pe 3 (not pe 2, home's).
  auto p = map_lv(vg, *root, 2 * kExtent - 100, 200);
  REQUIRE(p.size() == 2);
  CHECK(p[0].lv_offset == 2 * kExtent - 100);
  CHECK(p[0].device_offset == kPeStart + 2 * kExtent - 100);
  CHECK(p[0].length == 100);
  CHECK(p[1].lv_offset == 2 * kExtent);
  CHECK(p[1].device_offset == kPeStart + 3 * kExtent);
  CHECK(p[1].length == 100);
  // Clipped at the end; nothing past it.
  p = map_lv(vg, *root, 3 * kExtent - 10, 1000);
  REQUIRE(p.size() == 1);
  CHECK(p[0].length == 10);
  CHECK(map_lv(vg, *root, 3 * kExtent, 10).empty());
  // The first segment's two extents are one piece.
  p = map_lv(vg, *root, 0, 2 * kExtent);
  REQUIRE(p.size() == 1);
  CHECK(p[0].length == 2 * kExtent);
}

TEST_CASE("lvm: a striped LV alternates chunks between PVs on two devices") {
  Pv a(8 * kMib, kUuid0), b(8 * kMib, kUuid1);
  std::string pvs = pv_text("pv0", kUuid0, 7) + pv_text("pv1", kUuid1, 7);
  // 4 extents over 2 stripes of 64 KiB: 2 extents on each, pv0 from pe 1, pv1 from pe 0.
  std::string lvs = lv_text("striped", segment(1, 0, 4, "\"pv0\", 1,\n\"pv1\", 0", 2, 128));
  std::string text = vg_text(5, pvs, lvs);
  a.commit(512, text);
  b.commit(512, text);
  auto scan = find_volume_groups({a.device(), b.device()});
  REQUIRE(scan.groups.size() == 1);
  auto& vg = scan.groups[0];
  REQUIRE(vg.lvs.size() == 1);
  auto& lv = vg.lvs[0];
  CHECK(lv.size == 4 * kExtent);
  auto p = map_lv(vg, lv, 0, 4 * 65536);
  REQUIRE(p.size() == 4);
  CHECK((p[0].device == 0 && p[0].device_offset == kPeStart + kExtent));
  CHECK((p[1].device == 1 && p[1].device_offset == kPeStart));
  CHECK((p[2].device == 0 && p[2].device_offset == kPeStart + kExtent + 65536));
  CHECK((p[3].device == 1 && p[3].device_offset == kPeStart + 65536));
  // The last byte: chunk 63 is on pv1, its 32nd chunk.
  p = map_lv(vg, lv, 4 * kExtent - 1, 1);
  REQUIRE(p.size() == 1);
  CHECK((p[0].device == 1 && p[0].device_offset == kPeStart + 32 * 65536 - 1));
  auto areas = lv_areas(vg, lv);
  REQUIRE(areas.size() == 2);
  CHECK(areas[0].length == 2 * kExtent);
}

TEST_CASE("lvm: metadata that wraps around the end of the circular buffer") {
  Pv pv(8 * kMib, kUuid0);
  std::string text = vg_text(9, pv_text("pv0", kUuid0, 7), two_segment_lvs());
  uint64_t at = kMdaSize - 512 * 2;  // two sectors before the end
  REQUIRE(text.size() > 1024);
  pv.commit(at, text);
  auto scan = scan_one(pv);
  REQUIRE(scan.groups.size() == 1);
  CHECK(scan.groups[0].seqno == 9);
  CHECK(scan.groups[0].lvs.size() == 2);
}

TEST_CASE("lvm: a newest copy failing its checksum falls back to the previous valid one") {
  Pv pv(8 * kMib, kUuid0);
  std::string old_text = vg_text(4, pv_text("pv0", kUuid0, 7), two_segment_lvs());
  uint64_t n = pv.put_text(512, old_text);
  uint64_t at = 512 + (n + 511) / 512 * 512;
  std::string new_text = vg_text(5, pv_text("pv0", kUuid0, 7), lv_text("other", segment(1, 0, 1, "\"pv0\", 5")));
  SECTION("the newest checks: it is used") {
    pv.commit(at, new_text);
    auto scan = scan_one(pv);
    REQUIRE(scan.groups.size() == 1);
    CHECK(scan.groups[0].seqno == 5);
    CHECK_FALSE(scan.groups[0].recovered);
    CHECK(scan.notes.empty());
  }
  SECTION("the newest fails its checksum: the older copy, marked recovered") {
    pv.commit(at, new_text, 0x12345678);
    auto scan = scan_one(pv);
    REQUIRE(scan.groups.size() == 1);
    CHECK(scan.groups[0].seqno == 4);
    CHECK(scan.groups[0].recovered);
    CHECK(find_lv(scan.groups[0], "root"));
    CHECK_FALSE(find_lv(scan.groups[0], "other"));
    REQUIRE(scan.notes.size() == 1);
    CHECK(scan.notes[0].find("checksum") != std::string::npos);
  }
  SECTION("the newest torn in the middle: the older copy") {
    pv.commit(at, new_text);
    pv.dev[kMdaStart + at + 100] = std::byte{'X'};
    auto scan = scan_one(pv);
    REQUIRE(scan.groups.size() == 1);
    CHECK(scan.groups[0].seqno == 4);
  }
  SECTION("a checked copy on another PV wins over a recovered one") {
    Pv other(8 * kMib, kUuid1);
    std::string text = vg_text(5, pv_text("pv0", kUuid0, 7) + pv_text("pv1", kUuid1, 7), two_segment_lvs());
    other.commit(512, text);
    pv.commit(at, text, 0x1);
    auto scan = find_volume_groups({pv.device(), other.device()});
    REQUIRE(scan.groups.size() == 1);
    CHECK(scan.groups[0].seqno == 5);
    CHECK_FALSE(scan.groups[0].recovered);
  }
}

TEST_CASE("lvm: broken labels, headers and texts give no volume group, and no crash") {
  Pv pv(8 * kMib, kUuid0);
  std::string text = vg_text(3, pv_text("pv0", kUuid0, 7), two_segment_lvs());
  pv.commit(512, text);
  REQUIRE(scan_one(pv).groups.size() == 1);
  SECTION("label checksum") {
    pv.dev[512 + 40] ^= std::byte{1};
    CHECK(scan_one(pv).groups.empty());
  }
  SECTION("metadata area header checksum") {
    pv.dev[kMdaStart + 41] ^= std::byte{1};
    CHECK(scan_one(pv).groups.empty());
  }
  SECTION("metadata area past the device") {
    put64(pv.dev, 512 + 112, 100 * kMib);
    pv.seal_label();
    CHECK(scan_one(pv).groups.empty());
  }
  SECTION("raw location past the area, or larger than it: only the scan finds the copy") {
    put64(pv.dev, kMdaStart + 40, kMdaSize + 512);
    pv.seal_header();
    auto scan = scan_one(pv);
    REQUIRE(scan.groups.size() == 1);
    CHECK(scan.groups[0].recovered);
    put64(pv.dev, kMdaStart + 40, 512);
    put64(pv.dev, kMdaStart + 48, ~uint64_t{0});
    pv.seal_header();
    CHECK(scan_one(pv).groups.empty());  // the copy at 512 is the one that failed: not rescued
  }
  SECTION("a truncated text, with a checksum that matches it") {
    std::string cut = text.substr(0, text.size() / 2);
    Pv t(8 * kMib, kUuid0);
    t.commit(512, cut);
    auto scan = scan_one(t);
    CHECK(scan.groups.empty());
    CHECK(scan.notes.size() == 1);
  }
  SECTION("an unterminated string, a stray brace, an overflowing number") {
    for (std::string bad : {vg_text(3, "", "") + "x = \"unterminated", "}" + text,
                            vg_text(1, "", "") + "n = 99999999999999999999\n"}) {
      Pv t(8 * kMib, kUuid0);
      t.commit(512, bad);
      CHECK(scan_one(t).groups.empty());
    }
  }
  SECTION("nesting deeper than any metadata") {
    std::string deep = "debian-vg {\nid = \"x\"\nseqno = 1\nextent_size = 8\n";
    for (int i = 0; i < 100; ++i) deep += "a {\n";
    for (int i = 0; i < 100; ++i) deep += "}\n";
    deep += "}\n";
    Pv t(8 * kMib, kUuid0);
    t.commit(512, deep);
    CHECK(scan_one(t).groups.empty());
  }
  SECTION("a list of a million values") {
    std::string big = "debian-vg {\nid = \"x\"\nseqno = 1\nextent_size = 8\nl = [";
    for (int i = 0; i < 600000; ++i) big += "1,";
    big += "]\n}\n";
    Pv t(8 * kMib, kUuid0);
    t.commit(512, big);
    CHECK(scan_one(t).groups.empty());
  }
}

TEST_CASE("lvm: hostile segments are reported, not mapped") {
  Pv pv(8 * kMib, kUuid0);
  std::string lvs =
      lv_text("overlap", segment(1, 0, 2, "\"pv0\", 0") + segment(2, 1, 2, "\"pv0\", 3")) +
      lv_text("gap", segment(1, 0, 1, "\"pv0\", 0") + segment(2, 2, 1, "\"pv0\", 3")) +
      lv_text("same", segment(1, 0, 1, "\"pv0\", 0") + segment(2, 0, 1, "\"pv0\", 0")) +
      lv_text("absurd", segment(1, 0, uint64_t{1} << 62, "\"pv0\", 0")) +
      lv_text("overflow", segment(1, 0, 1, "\"pv0\", 9223372036854775807")) +
      lv_text("pastpv", segment(1, 0, 3, "\"pv0\", 5")) +
      lv_text("pastdisk", segment(1, 0, 1, "\"pv1\", 0")) +
      lv_text("nopv", segment(1, 0, 1, "\"pv9\", 0")) +
      lv_text("elsewhere", segment(1, 0, 1, "\"pv2\", 0")) +
      lv_text("badstripes", segment(1, 0, 3, "\"pv0\", 0,\n\"pv0\", 3", 2, 128)) +
      lv_text("tinychunk", segment(1, 0, 2, "\"pv0\", 0,\n\"pv0\", 3", 2, 1)) +
      lv_text("thin", "segment1 {\nstart_extent = 0\nextent_count = 1\ntype = \"thin\"\nthin_pool = \"pool\"\n}\n") +
      lv_text("pool", "segment1 {\nstart_extent = 0\nextent_count = 1\ntype = \"thin-pool\"\n}\n") +
      lv_text("pool_tdata", segment(1, 0, 1, "\"pv0\", 0"), false) +
      lv_text("mirror", "segment1 {\nstart_extent = 0\nextent_count = 1\ntype = \"raid1\"\n}\n") +
      lv_text("snap", segment(1, 0, 1, "\"pv0\", 6")) +
      lv_text("snapshot0", "segment1 {\nstart_extent = 0\nextent_count = 1\ntype = \"snapshot\"\n"
                           "cow_store = \"snap\"\norigin = \"good\"\n}\n", false) +
      lv_text("good", segment(1, 0, 1, "\"pv0\", 4"));
  // pv1: on the disk by its metadata, but its pe_count runs past the device.
  Pv pv1(kMib + kMib / 2, kUuid1);
  std::string pvs = pv_text("pv0", kUuid0, 7) + pv_text("pv1", kUuid1, 100) +
                    pv_text("pv2", "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC2", 10);
  pv.commit(512, vg_text(3, pvs, lvs));
  auto scan = find_volume_groups({pv.device(), pv1.device()});
  REQUIRE(scan.groups.size() == 1);
  auto& vg = scan.groups[0];
  REQUIRE(vg.lvs.size() == 1);
  CHECK(vg.lvs[0].name == "good");
  CHECK(reason(vg, "overlap") == "segments overlap or leave gaps");
  CHECK(reason(vg, "gap") == "segments overlap or leave gaps");
  CHECK(reason(vg, "same") == "segments overlap or leave gaps");
  CHECK(reason(vg, "absurd") == "sizes overflow");
  CHECK(reason(vg, "overflow") == "extends past the end of its PV");
  CHECK(reason(vg, "pastpv") == "extends past the end of its PV");
  CHECK(reason(vg, "pastdisk") == "extends past the end of its PV");
  CHECK(reason(vg, "nopv") == "on another LV or an unknown PV (not supported)");
  CHECK(reason(vg, "elsewhere") == "on a PV not on this disk (not supported)");
  CHECK(reason(vg, "badstripes") == "stripes not understood");
  CHECK(reason(vg, "tinychunk") == "stripes not understood");
  CHECK(reason(vg, "thin") == "thin volume (not supported)");
  CHECK(reason(vg, "pool") == "thin pool (not supported)");
  CHECK(reason(vg, "mirror") == "RAID (raid1, not supported)");
  CHECK(reason(vg, "snap") == "snapshot (not supported)");
  CHECK(reason(vg, "pool_tdata").empty());  // hidden: part of the pool
  CHECK(reason(vg, "snapshot0").empty());
}

TEST_CASE("lvm: one PV found twice on a disk is ambiguous") {
  Pv a(8 * kMib, kUuid0);
  a.commit(512, vg_text(3, pv_text("pv0", kUuid0, 7), two_segment_lvs()));
  Pv b = a;
  auto scan = find_volume_groups({a.device(), b.device()});
  REQUIRE(scan.groups.size() == 1);
  CHECK(scan.groups[0].lvs.empty());
  CHECK(reason(scan.groups[0], "root") == "its PV is found twice on this disk (ambiguous)");
}

TEST_CASE("lvm: names outside LVM's rules are not used as file names") {
  Pv pv(8 * kMib, kUuid0);
  pv.commit(512, vg_text(3, pv_text("pv0", kUuid0, 7), two_segment_lvs(), "../etc"));
  CHECK(scan_one(pv).groups.empty());  // '/' is no name character: the text does not parse
}

// A disk with an MBR: partition 1 at 1 MiB (not LVM), partition 2 at 5 MiB
// holding the PV. root's bytes are a pattern telling their LV offset.
TEST_CASE("lvm: the mount view shows each LV of a point, through its partition") {
  test::TestRepo t;
  constexpr uint64_t kPart2 = 5 * kMib, kPart2Size = 8 * kMib, kDisk = 14 * kMib;
  Pv pv(kPart2Size, kUuid0);
  std::string lvs = two_segment_lvs() + lv_text("thin", "segment1 {\nstart_extent = 0\nextent_count = 1\n"
                                                         "type = \"thin\"\n}\n");
  pv.commit(512, vg_text(3, pv_text("pv0", kUuid0, 7), lvs));
  Bytes disk(kDisk);
  auto mbr = [&](int i, uint64_t start, uint64_t size, uint8_t type) {
    size_t e = 446 + 16 * static_cast<size_t>(i);
    disk[e + 4] = std::byte{type};
    for (int k = 0; k < 4; ++k) {
      disk[e + 8 + k] = static_cast<std::byte>((start / 512) >> (8 * k));
      disk[e + 12 + k] = static_cast<std::byte>((size / 512) >> (8 * k));
    }
  };
  mbr(0, kMib, 4 * kMib, 0x83);
  mbr(1, kPart2, kPart2Size, 0x8e);
  disk[510] = std::byte{0x55};
  disk[511] = std::byte{0xaa};
  std::memcpy(disk.data() + kPart2, pv.dev.data(), pv.dev.size());
  // root: extents 0-1 at pe 0-1, extent 2 at pe 3; home at pe 2.
  auto fill = [&](uint64_t dev_off, uint64_t len, uint64_t lv_off, uint8_t tag) {
    for (uint64_t i = 0; i < len; i += 8) {
      uint64_t v = (lv_off + i) | (uint64_t{tag} << 56);
      std::memcpy(disk.data() + kPart2 + dev_off + i, &v, 8);
    }
  };
  fill(kPeStart, 2 * kExtent, 0, 1);
  fill(kPeStart + 3 * kExtent, kExtent, 2 * kExtent, 1);
  fill(kPeStart + 2 * kExtent, kExtent, 0, 2);
  t.write(test::kVdi, disk, 1795741200);
  t.write(test::kVdi, disk, 1795741200 + 86400);

  MountView view(t.repo);
  std::string dir = "/" + test::kVdi + "/";
  auto listing = view.list(dir);
  REQUIRE(listing);
  std::set<std::string> names;
  for (auto& [n, _] : *listing) names.insert(n);
  CHECK(names.count("2026-11-27T010000Z-lv-debian--vg-root.raw"));
  CHECK(names.count("2026-11-28T010000Z-lv-debian--vg-home.raw"));
  CHECK(names.count("latest-lv-debian--vg-root.raw"));
  CHECK(names.count("2026-11-27T010000Z-part2.raw"));
  CHECK_FALSE(names.count("2026-11-27T010000Z-lv-debian--vg-thin.raw"));

  auto e = view.lookup(dir + "2026-11-27T010000Z-lv-debian--vg-root.raw");
  REQUIRE(e);
  REQUIRE(e->lv);
  CHECK(e->size == 3 * kExtent);
  PointReader r(t.repo, e->point);
  Bytes got(e->size);
  for (auto& rg : e->lv->map(0, e->size)) {
    REQUIRE(rg.disk_offset + rg.length <= kDisk);
    r.read(rg.disk_offset, std::span(got).subspan(rg.lv_offset, rg.length));
  }
  bool ok = true;
  for (uint64_t i = 0; i < got.size() && ok; i += 8) {
    uint64_t v;
    std::memcpy(&v, got.data() + i, 8);
    ok = v == (i | (uint64_t{1} << 56));
  }
  CHECK(ok);
  CHECK(view.allocated_bytes(*e) == 3 * kExtent);

  auto link = view.lookup(dir + "latest-lv-debian--vg-root.raw");
  REQUIRE(link);
  CHECK(link->target == "2026-11-28T010000Z-lv-debian--vg-root.raw");

  auto attrs = view.xattrs(*e);
  auto attr = [&](const std::vector<std::pair<std::string, std::string>>& a, const std::string& k) {
    for (auto& [key, v] : a)
      if (key == k) return v;
    return std::string("(none)");
  };
  CHECK(attr(attrs, "user.cbtfs.lv.vg") == "debian-vg");
  CHECK(attr(attrs, "user.cbtfs.lv.lv") == "root");
  CHECK(attr(attrs, "user.cbtfs.lv.uuid") == "lvuuid-root");
  CHECK(attr(attrs, "user.cbtfs.lv.segments") == "0+2:pv0@0 2+1:pv0@3");
  CHECK(attr(attrs, "user.cbtfs.virtual_size") == std::to_string(3 * kExtent));
  auto img = view.lookup(dir + "2026-11-27T010000Z.raw");
  REQUIRE(img);
  CHECK(attr(view.xattrs(*img), "user.cbtfs.lvm.skipped") == "debian-vg/thin: thin volume (not supported)");
  auto part = view.lookup(dir + "2026-11-27T010000Z-part2.raw");
  REQUIRE(part);
  CHECK(attr(view.xattrs(*part), "user.cbtfs.lvm.skipped") == "(none)");
}
