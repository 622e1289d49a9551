// LVM2 on-disk format, as lvm2 writes it (lib/format_text/layout.h):
//   label (one of sectors 0-3): "LABELONE", its sector, crc of bytes 20-511,
//     offset of the PV header, "LVM2 001"
//   PV header: uuid (32 chars), device size, data areas then metadata areas
//     as (offset, size) lists, each ended by a zero offset
//   metadata area: a 512-byte header (crc of bytes 4-511, magic, version 1,
//     its own start and size, raw locations), then a circular buffer; the
//     first raw location names the committed text (offset from the area's
//     start, size, crc); a text that runs past the end continues right
//     after the header
//   text: `vgname { id = "..." seqno = N extent_size = S physical_volumes
//     { pv0 { id pe_start pe_count } } logical_volumes { lv { id status
//     segmentN { start_extent extent_count type stripe_count stripe_size
//     stripes = ["pv0", pe, ...] } } } }` and a few top-level values.
#include "lvm.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>
#include <variant>

namespace cbtfs::lvm {

namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMdaHeader = 512;
constexpr uint64_t kMaxScan = 16u << 20;        // fallback scan of one metadata area
constexpr size_t kMaxScanCandidates = 16;
constexpr uint64_t kMaxScanText = 32u << 20;  // bytes of candidate texts parsed in one area
constexpr size_t kMaxMdas = 8;
constexpr const char kMdaMagic[] = " LVM2 x[5A%r0N*>";

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1) ? 0xedb88320u : 0);
    t[i] = c;
  }
  return t;
}
constexpr auto kCrcTable = make_table();

uint32_t le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t le64(const std::byte* p) { return le32(p) | (uint64_t{le32(p + 4)} << 32); }

// A second fuzz target builds this file with CBTFS_FUZZ_NO_HEADER_CRC so
// that mutated labels and area headers get past their checksums and their
// fields are explored; the texts' checksums (and the fallback) stay real.
bool header_crc_ok(uint32_t computed, uint32_t stored) {
#ifdef CBTFS_FUZZ_NO_HEADER_CRC
  (void)computed, (void)stored;
  return true;
#else
  return computed == stored;
#endif
}

bool mul(uint64_t a, uint64_t b, uint64_t& out) { return !__builtin_mul_overflow(a, b, &out); }
bool add(uint64_t a, uint64_t b, uint64_t& out) { return !__builtin_add_overflow(a, b, &out); }

std::string strip_dashes(std::string_view s) {
  std::string out;
  for (char c : s)
    if (c != '-') out += c;
  return out;
}

// ---- the text format ----

struct Node {
  enum class Type { Int, Str, List, Section };
  std::string key;
  Type type = Type::Int;
  int64_t i = 0;
  std::string s;
  std::vector<Node> items;  // List: Int/Str values; Section: children
  const Node* child(std::string_view k) const {
    for (auto& c : items)
      if (c.key == k) return &c;
    return nullptr;
  }
  std::optional<int64_t> get_int(std::string_view k) const {
    auto* c = child(k);
    if (!c || c->type != Type::Int) return std::nullopt;
    return c->i;
  }
  std::optional<std::string> get_str(std::string_view k) const {
    auto* c = child(k);
    if (!c || c->type != Type::Str) return std::nullopt;
    return c->s;
  }
  bool list_has(std::string_view k, std::string_view v) const {
    auto* c = child(k);
    if (!c || c->type != Type::List) return false;
    for (auto& x : c->items)
      if (x.type == Type::Str && x.s == v) return true;
    return false;
  }
};

bool ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '+' ||
         c == '.' || c == '-';
}

class Parser {
 public:
  explicit Parser(std::string_view t) : t_(t) {}
  std::optional<Node> parse() {
    Node root;
    root.type = Node::Type::Section;
    if (!body(root, 0)) return std::nullopt;
    skip();
    if (p_ != t_.size()) return std::nullopt;  // a stray '}'
    return root;
  }

 private:
  void skip() {
    while (p_ < t_.size()) {
      char c = t_[p_];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
        ++p_;
      } else if (c == '#') {
        while (p_ < t_.size() && t_[p_] != '\n') ++p_;
      } else {
        break;
      }
    }
  }
  bool count() { return ++nodes_ <= kMaxNodes; }
  std::optional<std::string> ident() {
    size_t b = p_;
    while (p_ < t_.size() && ident_char(t_[p_])) ++p_;
    if (p_ == b) return std::nullopt;
    return std::string(t_.substr(b, p_ - b));
  }
  bool body(Node& sec, int depth) {
    if (depth > kMaxDepth) return false;
    for (;;) {
      skip();
      if (p_ >= t_.size() || t_[p_] == '}') return true;
      auto key = ident();
      if (!key || !count()) return false;
      skip();
      if (p_ >= t_.size()) return false;
      Node n;
      n.key = std::move(*key);
      if (t_[p_] == '{') {
        ++p_;
        n.type = Node::Type::Section;
        if (!body(n, depth + 1)) return false;
        if (p_ >= t_.size() || t_[p_] != '}') return false;
        ++p_;
      } else if (t_[p_] == '=') {
        ++p_;
        skip();
        if (p_ < t_.size() && t_[p_] == '[') {
          ++p_;
          n.type = Node::Type::List;
          for (;;) {
            skip();
            if (p_ >= t_.size()) return false;
            if (t_[p_] == ']') {
              ++p_;
              break;
            }
            Node v;
            if (!scalar(v) || !count()) return false;
            n.items.push_back(std::move(v));
            skip();
            if (p_ < t_.size() && t_[p_] == ',') ++p_;
            else if (p_ >= t_.size() || t_[p_] != ']') return false;
          }
        } else if (!scalar(n)) {
          return false;
        }
      } else {
        return false;
      }
      sec.items.push_back(std::move(n));
    }
  }
  bool scalar(Node& n) {
    if (p_ >= t_.size()) return false;
    char c = t_[p_];
    if (c == '"' || c == '\'') {
      ++p_;
      n.type = Node::Type::Str;
      while (p_ < t_.size() && t_[p_] != c) {
        if (t_[p_] == '\\' && p_ + 1 < t_.size()) ++p_;
        n.s += t_[p_++];
      }
      if (p_ >= t_.size()) return false;
      ++p_;
      return true;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
      size_t b = p_;
      bool neg = c == '-';
      if (neg) ++p_;
      uint64_t v = 0;
      size_t digits = 0;
      while (p_ < t_.size() && t_[p_] >= '0' && t_[p_] <= '9') {
        if (!mul(v, 10, v) || !add(v, static_cast<uint64_t>(t_[p_] - '0'), v) || v > uint64_t{INT64_MAX})
          return false;
        ++p_, ++digits;
      }
      if (!digits) return false;
      if (p_ < t_.size() && t_[p_] == '.') {  // a float: kept as text, no field here is one
        ++p_;
        while (p_ < t_.size() && t_[p_] >= '0' && t_[p_] <= '9') ++p_;
        n.type = Node::Type::Str;
        n.s = std::string(t_.substr(b, p_ - b));
        return true;
      }
      n.type = Node::Type::Int;
      n.i = neg ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
      return true;
    }
    auto w = ident();  // a bare word
    if (!w) return false;
    n.type = Node::Type::Str;
    n.s = std::move(*w);
    return true;
  }

  std::string_view t_;
  size_t p_ = 0;
  size_t nodes_ = 0;
};

// LVM's rule for VG and LV names.
bool valid_name(const std::string& s) {
  if (s.empty() || s.size() > 127 || s[0] == '-' || s == "." || s == "..") return false;
  return std::all_of(s.begin(), s.end(), ident_char);
}

// ---- one parsed metadata copy ----

struct RawPv {
  std::string name, uuid;
  uint64_t pe_start = 0, pe_count = 0;  // sectors, extents
  bool missing = false;
};
struct RawSegment {
  uint64_t start_extent = 0, extent_count = 0, stripe_size = 0;  // stripe_size in sectors
  std::string type;
  int64_t stripe_count = 0;
  std::vector<std::pair<std::string, uint64_t>> stripes;
  bool stripes_ok = true;
  std::string cow_store;
};
struct RawLv {
  std::string name, uuid;
  bool visible = false;
  std::vector<RawSegment> segments;
};
struct Metadata {
  std::string name, uuid;
  uint64_t seqno = 0, extent_size = 0;  // sectors
  std::vector<RawPv> pvs;
  std::vector<RawLv> lvs;
  bool checked = true;
};

std::optional<uint64_t> nonneg(const Node& n, std::string_view k) {
  auto v = n.get_int(k);
  if (!v || *v < 0) return std::nullopt;
  return static_cast<uint64_t>(*v);
}

std::optional<Metadata> to_metadata(std::string_view text) {
  auto root = Parser(text).parse();
  if (!root) return std::nullopt;
  const Node* vg = nullptr;
  for (auto& c : root->items)
    if (c.type == Node::Type::Section) {
      vg = &c;
      break;
    }
  if (!vg || !valid_name(vg->key)) return std::nullopt;
  Metadata md;
  md.name = vg->key;
  auto id = vg->get_str("id");
  auto seq = nonneg(*vg, "seqno");
  auto es = nonneg(*vg, "extent_size");
  if (!id || id->empty() || id->size() > 64 || !seq || !es || *es == 0 || *es > (uint64_t{1} << 32))
    return std::nullopt;
  md.uuid = *id;
  md.seqno = *seq;
  md.extent_size = *es;
  if (auto* pvs = vg->child("physical_volumes"); pvs && pvs->type == Node::Type::Section) {
    for (auto& p : pvs->items) {
      if (p.type != Node::Type::Section) continue;
      if (md.pvs.size() >= kMaxPvs) return std::nullopt;
      RawPv pv;
      pv.name = p.key;
      auto pid = p.get_str("id");
      auto start = nonneg(p, "pe_start");
      auto cnt = nonneg(p, "pe_count");
      if (!pid || !start || !cnt) return std::nullopt;
      pv.uuid = *pid;
      pv.pe_start = *start;
      pv.pe_count = *cnt;
      pv.missing = p.list_has("flags", "MISSING");
      md.pvs.push_back(std::move(pv));
    }
  }
  size_t total_segments = 0;
  if (auto* lvs = vg->child("logical_volumes"); lvs && lvs->type == Node::Type::Section) {
    for (auto& l : lvs->items) {
      if (l.type != Node::Type::Section) continue;
      if (md.lvs.size() >= kMaxLvs) return std::nullopt;
      RawLv lv;
      lv.name = l.key;
      lv.uuid = l.get_str("id").value_or("");
      lv.visible = l.list_has("status", "VISIBLE");
      for (auto& s : l.items) {
        if (s.type != Node::Type::Section || !s.key.starts_with("segment")) continue;
        if (++total_segments > kMaxSegments) return std::nullopt;
        RawSegment seg;
        auto se = nonneg(s, "start_extent");
        auto ec = nonneg(s, "extent_count");
        auto type = s.get_str("type");
        if (!se || !ec || !type) return std::nullopt;
        seg.start_extent = *se;
        seg.extent_count = *ec;
        seg.type = *type;
        seg.stripe_count = s.get_int("stripe_count").value_or(0);
        seg.stripe_size = nonneg(s, "stripe_size").value_or(0);
        seg.cow_store = s.get_str("cow_store").value_or("");
        if (auto* st = s.child("stripes"); st && st->type == Node::Type::List) {
          if (st->items.size() % 2 || st->items.size() > 2 * kMaxStripes) {
            seg.stripes_ok = false;
          } else {
            for (size_t k = 0; k < st->items.size(); k += 2) {
              auto& a = st->items[k];
              auto& b = st->items[k + 1];
              if (a.type != Node::Type::Str || b.type != Node::Type::Int || b.i < 0) {
                seg.stripes_ok = false;
                break;
              }
              seg.stripes.emplace_back(a.s, static_cast<uint64_t>(b.i));
            }
          }
        } else {
          seg.stripes_ok = false;
        }
        lv.segments.push_back(std::move(seg));
      }
      md.lvs.push_back(std::move(lv));
    }
  }
  return md;
}

// ---- labels and metadata areas ----

struct Area {
  uint64_t offset = 0, size = 0;
};

struct Label {
  std::string uuid;  // 32 chars, no dashes
  std::vector<Area> mdas;
};

std::optional<Label> read_label(const Device& d) {
  if (d.size < 4 * kSector) return std::nullopt;
  for (uint64_t s = 0; s < 4; ++s) {
    std::array<std::byte, kSector> b{};
    d.read(s * kSector, b);
    if (std::memcmp(b.data(), "LABELONE", 8) != 0 || le64(b.data() + 8) != s) continue;
    if (!header_crc_ok(crc(kInitialCrc, std::span(b).subspan(20)), le32(b.data() + 16))) continue;
    if (std::memcmp(b.data() + 24, "LVM2 001", 8) != 0) continue;
    uint32_t off = le32(b.data() + 20);
    if (off < 32 || off > kSector - 56) continue;
    Label l;
    for (size_t i = 0; i < 32; ++i) l.uuid += static_cast<char>(b[off + i]);
    // Data areas, then metadata areas, each list ended by a zero offset.
    size_t p = off + 40;
    int list = 0;
    bool ok = true;
    while (list < 2) {
      if (p + 16 > kSector) {
        ok = false;
        break;
      }
      uint64_t ao = le64(b.data() + p), as = le64(b.data() + p + 8);
      p += 16;
      if (ao == 0) {
        ++list;
        continue;
      }
      if (list == 1) {
        if (l.mdas.size() >= kMaxMdas) break;
        l.mdas.push_back({ao, as});
      }
    }
    if (!ok) continue;
    return l;
  }
  return std::nullopt;
}

void read_circular(const Device& d, const Area& a, uint64_t off, uint64_t size, std::string& out) {
  // off in [kMdaHeader, a.size), size <= a.size - kMdaHeader: checked by the caller.
  uint64_t first = std::min(size, a.size - off);
  out.resize(size);
  auto* p = reinterpret_cast<std::byte*>(out.data());
  d.read(a.offset + off, {p, first});
  if (size > first) d.read(a.offset + kMdaHeader, {p + first, size - first});
}

std::string_view until_nul(const std::string& s) {
  auto n = s.find('\0');
  return std::string_view(s).substr(0, n == std::string::npos ? s.size() : n);
}

void scan_area(const Device& d, const Area& a, uint64_t skip_offset, std::vector<Metadata>& out) {
  uint64_t ring = a.size - kMdaHeader;
  if (ring > kMaxScan) return;
  std::string buf(ring, '\0');
  d.read(a.offset + kMdaHeader, {reinterpret_cast<std::byte*>(buf.data()), buf.size()});
  size_t tried = 0;
  uint64_t parsed = 0;
  for (uint64_t p = 0; p < ring && tried < kMaxScanCandidates && parsed < kMaxScanText; p += kSector) {
    if (p + kMdaHeader == skip_offset) continue;
    // A copy starts with the VG's name and '{'.
    uint64_t q = p;
    while (q < ring && q - p < 128 && ident_char(buf[q])) ++q;
    if (q == p) continue;
    while (q < ring && (buf[q] == ' ' || buf[q] == '\t')) ++q;
    if (q >= ring || buf[q] != '{') continue;
    ++tried;
    uint64_t len = std::min<uint64_t>(ring, kMaxText);
    std::string text;
    text.reserve(len);
    for (uint64_t k = 0; k < len; ++k) {
      char c = buf[(p + k) % ring];
      if (c == '\0') break;
      text += c;
    }
    parsed += text.size();
    if (auto md = to_metadata(text)) {
      md->checked = false;
      out.push_back(std::move(*md));
    }
  }
}

// The metadata of one area: the committed copy when it checks, else older
// copies found in the circular buffer (which have no checksum: they parse).
void read_area(const Device& d, const Area& a, std::vector<Metadata>& out) {
  uint64_t end;
  if (a.size <= kMdaHeader + kSector || !add(a.offset, a.size, end) || end > d.size) return;
  std::array<std::byte, kMdaHeader> h{};
  d.read(a.offset, h);
  if (!header_crc_ok(crc(kInitialCrc, std::span(h).subspan(4)), le32(h.data()))) return;
  if (std::memcmp(h.data() + 4, kMdaMagic, 16) != 0 || le32(h.data() + 20) != 1) return;
  if (le64(h.data() + 24) != a.offset) return;
  const std::byte* r = h.data() + 40;  // the committed raw location
  uint64_t off = le64(r), size = le64(r + 8);
  uint32_t sum = le32(r + 16), flags = le32(r + 20);
  if (flags & 1) return;  // metadata ignored on this PV
  if (off == 0) return;   // no metadata here
  if (off >= kMdaHeader && off < a.size && size > 0 && size <= a.size - kMdaHeader && size <= kMaxText) {
    std::string text;
    read_circular(d, a, off, size, text);
    if (crc(kInitialCrc, std::as_bytes(std::span(text))) == sum) {
      if (auto md = to_metadata(until_nul(text))) {
        out.push_back(std::move(*md));
        return;
      }
    }
  }
  scan_area(d, a, off, out);
}

std::string reason_for_type(const std::string& t) {
  if (t == "thin") return "thin volume (not supported)";
  if (t == "thin-pool") return "thin pool (not supported)";
  if (t.starts_with("raid") || t == "mirror") return "RAID (" + t + ", not supported)";
  if (t == "cache" || t == "cache-pool" || t == "writecache") return "cache (" + t + ", not supported)";
  if (t == "snapshot") return "snapshot (not supported)";
  if (t.starts_with("vdo")) return "VDO (not supported)";
  std::string shown;
  for (char c : t.substr(0, 40)) shown += ident_char(c) ? c : '_';
  return "segment type " + shown + " (not supported)";
}

std::string shown_name(const std::string& s) {
  if (valid_name(s)) return s;
  std::string out;
  for (char c : s.substr(0, 64)) out += ident_char(c) ? c : '_';
  return out.empty() ? "_" : out;
}

struct PvPlace {
  uint32_t device = 0;
  int count = 0;
};

// Builds the VG from its chosen metadata and where its PVs were found.
VolumeGroup assemble(const Metadata& md, const std::map<std::string, PvPlace>& places,
                     const std::vector<Device>& devices) {
  VolumeGroup vg;
  vg.name = md.name;
  vg.uuid = md.uuid;
  vg.seqno = md.seqno;
  vg.recovered = !md.checked;
  vg.extent_size = md.extent_size * kSector;
  // PV name -> index in vg.pvs, or a reason it cannot be used.
  std::map<std::string, std::variant<uint32_t, std::string>> pv_by_name;
  for (auto& p : md.pvs) {
    auto it = places.find(strip_dashes(p.uuid));
    if (pv_by_name.count(p.name)) {
      pv_by_name[p.name] = std::string("PV name " + shown_name(p.name) + " twice in the metadata");
      continue;
    }
    if (p.missing || it == places.end()) {
      pv_by_name[p.name] = std::string("on a PV not on this disk (not supported)");
      continue;
    }
    if (it->second.count > 1) {
      pv_by_name[p.name] = std::string("its PV is found twice on this disk (ambiguous)");
      continue;
    }
    uint64_t start, extents_bytes, end;
    if (!mul(p.pe_start, kSector, start) || !mul(p.pe_count, vg.extent_size, extents_bytes) ||
        !add(start, extents_bytes, end)) {
      pv_by_name[p.name] = std::string("its PV's size overflows");
      continue;
    }
    pv_by_name[p.name] = static_cast<uint32_t>(vg.pvs.size());
    vg.pvs.push_back({p.name, p.uuid, it->second.device, start, p.pe_count});
  }
  std::set<std::string> cow;  // the COW stores of snapshots: their bytes are not a volume
  for (auto& l : md.lvs)
    for (auto& s : l.segments)
      if (s.type == "snapshot" && !s.cow_store.empty()) cow.insert(s.cow_store);
  std::set<std::string> names;
  for (auto& l : md.lvs) {
    if (!valid_name(l.name) || !names.insert(l.name).second) {
      vg.skipped.push_back({shown_name(l.name), "invalid or repeated name"});
      continue;
    }
    if (cow.count(l.name)) {
      vg.skipped.push_back({l.name, "snapshot (not supported)"});
      continue;
    }
    if (!l.visible) continue;  // a part of another LV (pool data, RAID image, ...)
    std::string reason;
    for (auto& s : l.segments)
      if (s.type != "striped" && s.type != "linear") {
        reason = reason_for_type(s.type);
        break;
      }
    LogicalVolume lv;
    lv.name = l.name;
    lv.uuid = l.uuid;
    std::vector<const RawSegment*> segs;
    for (auto& s : l.segments) segs.push_back(&s);
    std::sort(segs.begin(), segs.end(), [](auto* a, auto* b) { return a->start_extent < b->start_extent; });
    uint64_t next = 0;
    if (reason.empty() && segs.empty()) reason = "no segments";
    for (auto* s : segs) {
      if (!reason.empty()) break;
      if (s->start_extent != next || s->extent_count == 0 || !add(next, s->extent_count, next)) {
        reason = "segments overlap or leave gaps";
        break;
      }
      uint64_t n = s->stripes.size();
      if (!s->stripes_ok || n == 0 || n > kMaxStripes || (s->stripe_count != 0 && uint64_t(s->stripe_count) != n) ||
          s->extent_count % n) {
        reason = "stripes not understood";
        break;
      }
      Segment seg;
      seg.start_extent = s->start_extent;
      seg.extent_count = s->extent_count;
      uint64_t area = s->extent_count / n, area_bytes;  // extents per stripe
      if (!mul(area, vg.extent_size, area_bytes)) {
        reason = "sizes overflow";
        break;
      }
      if (n > 1) {
        uint64_t ss = s->stripe_size;
        // dm-stripe: a power of two, and each stripe a whole number of chunks.
        if (ss < 8 || ss > (uint64_t{1} << 32) || (ss & (ss - 1)) || area_bytes % (ss * kSector)) {
          reason = "stripes not understood";
          break;
        }
        seg.stripe_size = ss * kSector;
      }
      for (auto& [pvname, pe] : s->stripes) {
        auto it = pv_by_name.find(pvname);
        if (it == pv_by_name.end()) {
          reason = "on another LV or an unknown PV (not supported)";
          break;
        }
        if (auto* why = std::get_if<std::string>(&it->second)) {
          reason = *why;
          break;
        }
        uint32_t pvi = std::get<uint32_t>(it->second);
        auto& pv = vg.pvs[pvi];
        uint64_t end_pe, at, end;
        if (!add(pe, area, end_pe) || end_pe > pv.pe_count || !mul(pe, vg.extent_size, at) ||
            !add(at, pv.pe_start, at) || !add(at, area_bytes, end) || end > devices[pv.device].size) {
          reason = "extends past the end of its PV";
          break;
        }
        seg.stripes.push_back({pvi, pe});
      }
      if (!reason.empty()) break;
      lv.segments.push_back(std::move(seg));
    }
    if (reason.empty() && (!mul(next, vg.extent_size, lv.size) || lv.size > uint64_t{INT64_MAX}))
      reason = "sizes overflow";
    if (!reason.empty()) {
      vg.skipped.push_back({l.name, reason});
      continue;
    }
    vg.lvs.push_back(std::move(lv));
  }
  return vg;
}

}  // namespace

uint32_t crc(uint32_t c, std::span<const std::byte> data) {
  for (auto b : data) c = (c >> 8) ^ kCrcTable[(c ^ static_cast<uint8_t>(b)) & 0xff];
  return c;
}

Scan find_volume_groups(const std::vector<Device>& devices) {
  Scan scan;
  std::map<std::string, PvPlace> places;  // PV uuid (no dashes) -> device
  std::vector<Metadata> copies;
  for (uint32_t i = 0; i < devices.size(); ++i) {
    auto label = read_label(devices[i]);
    if (!label) continue;
    auto& place = places[label->uuid];
    place.device = i;
    ++place.count;
    size_t had = copies.size();
    for (auto& a : label->mdas) read_area(devices[i], a, copies);
    if (!label->mdas.empty() && copies.size() == had)
      scan.notes.push_back("PV " + shown_name(label->uuid) + " (device " + std::to_string(i) + "): no readable metadata");
  }
  // The newest checked copy of each VG; an unchecked one only when none checks.
  std::map<std::string, const Metadata*> best;
  for (auto& c : copies) {
    auto& b = best[strip_dashes(c.uuid)];
    auto rank = [](const Metadata* m) { return std::pair{m->checked, m->seqno}; };
    if (!b || rank(&c) > rank(b)) b = &c;
  }
  for (auto& [_, md] : best) scan.groups.push_back(assemble(*md, places, devices));
  std::sort(scan.groups.begin(), scan.groups.end(),
            [](auto& a, auto& b) { return std::tie(a.name, a.uuid) < std::tie(b.name, b.uuid); });
  for (auto& g : scan.groups)
    if (g.recovered)
      scan.notes.push_back(g.name + ": the newest metadata fails its checksum, an older copy (seqno " +
                           std::to_string(g.seqno) + ") is used");
  return scan;
}

std::vector<Piece> map_lv(const VolumeGroup& vg, const LogicalVolume& lv, uint64_t offset, uint64_t length,
                          size_t max_pieces) {
  std::vector<Piece> out;
  if (offset >= lv.size) return out;
  uint64_t end = offset + std::min(length, lv.size - offset);
  // The segment holding offset: segments are contiguous and sorted.
  auto it = std::upper_bound(lv.segments.begin(), lv.segments.end(), offset / vg.extent_size,
                             [](uint64_t e, const Segment& s) { return e < s.start_extent; });
  if (it == lv.segments.begin()) return out;
  --it;
  uint64_t pos = offset;
  for (; it != lv.segments.end() && pos < end && out.size() < max_pieces; ++it) {
    const Segment& s = *it;
    uint64_t seg_start = s.start_extent * vg.extent_size;
    uint64_t seg_end = seg_start + s.extent_count * vg.extent_size;
    uint64_t n = s.stripes.size();
    while (pos < end && pos < seg_end && out.size() < max_pieces) {
      uint64_t in = pos - seg_start;
      uint64_t stripe = 0, at = in, len = std::min(end, seg_end) - pos;
      if (n > 1) {
        uint64_t chunk = in / s.stripe_size, within = in % s.stripe_size;
        stripe = chunk % n;
        at = (chunk / n) * s.stripe_size + within;
        len = std::min(len, s.stripe_size - within);
      }
      auto& pv = vg.pvs[s.stripes[stripe].pv];
      uint64_t dev = pv.pe_start + s.stripes[stripe].start_pe * vg.extent_size + at;
      if (!out.empty() && out.back().device == pv.device &&
          out.back().device_offset + out.back().length == dev)
        out.back().length += len;  // linear pieces that happen to follow each other
      else
        out.push_back({pos, len, pv.device, dev});
      pos += len;
    }
  }
  return out;
}

std::vector<Piece> lv_areas(const VolumeGroup& vg, const LogicalVolume& lv) {
  std::vector<Piece> out;
  for (auto& s : lv.segments) {
    uint64_t area = s.extent_count / s.stripes.size() * vg.extent_size;
    for (auto& st : s.stripes) {
      auto& pv = vg.pvs[st.pv];
      out.push_back({s.start_extent * vg.extent_size, area, pv.device, pv.pe_start + st.start_pe * vg.extent_size});
    }
  }
  return out;
}

std::string describe_segments(const VolumeGroup& vg, const LogicalVolume& lv) {
  std::string out;
  for (auto& s : lv.segments) {
    if (!out.empty()) out += ' ';
    out += std::to_string(s.start_extent) + "+" + std::to_string(s.extent_count) + ":";
    for (size_t k = 0; k < s.stripes.size(); ++k) {
      if (k) out += ',';
      out += vg.pvs[s.stripes[k].pv].name + "@" + std::to_string(s.stripes[k].start_pe);
    }
    if (s.stripe_size) out += "/" + std::to_string(s.stripe_size);
  }
  return out;
}

}  // namespace cbtfs::lvm
