// MountView: names in the mount, derived from manifests on every call.
#include "mount_view.hpp"

#include <syslog.h>

#include <algorithm>
#include <cctype>
#include <set>

namespace cbtfs {

namespace {

std::vector<std::string> split(const std::string& path) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    if (j > i) parts.push_back(path.substr(i, j - i));
    i = j + 1;
  }
  return parts;
}

// Length of the valid UTF-8 sequence at s[i], or 0.
size_t utf8_len(const std::string& s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return 0;
  if (n == 2 && c < 0xc2) return 0;  // overlong
  return n;
}

constexpr const char* kLatest = "latest.raw";
constexpr const char* kByName = "by-name";

}  // namespace

std::string sanitize_name(const std::string& name) {
  std::string out;
  for (size_t i = 0; i < name.size();) {
    size_t n = utf8_len(name, i);
    auto c = static_cast<unsigned char>(name[i]);
    bool bad = n == 0 || c < 0x20 || c == 0x7f || c == '/';
    if (out.size() + (bad ? 1 : n) > 200) break;
    if (bad) out += '_';
    else out.append(name, i, n);
    i += n ? n : 1;
  }
  if (out.empty()) out = "_";
  if (out == "." || out == "..") out = "_" + out;
  return out;
}

std::map<std::string, std::map<std::string, std::string>> MountView::by_name() {
  std::map<std::string, std::map<std::string, std::string>> tree;
  for (auto& vdi : repo_->vdis()) {
    auto m = repo_->latest(vdi);
    if (!m) continue;
    std::string vm = m->vm_name.empty() ? "_no-vm" : sanitize_name(m->vm_name);
    std::string name = m->vdi_name.empty() ? vdi : sanitize_name(m->vdi_name);
    auto& dir = tree[vm];
    // uuids are listed in sorted order, so the suffixes are stable.
    if (dir.count(name)) name += " (" + vdi.substr(0, 8) + ")";
    dir[name] = vdi;
  }
  return tree;
}

namespace {
// The names and entries of a VDI's directory, for listing and lookup alike.
ViewEntry image_entry(const ManifestPtr& m) { return {ViewEntry::Kind::Image, {}, m, m->time, 0, m->virtual_size, 0}; }
ViewEntry partition_entry(const ManifestPtr& m, const Partition& p) {
  return {ViewEntry::Kind::Image, {}, m, m->time, p.offset, p.size, p.number};
}
ViewEntry latest_entry(const ManifestPtr& last) {
  return {ViewEntry::Kind::Link, format_point_name(last->time) + ".raw", nullptr, last->time};
}
std::string partition_name(const std::string& point_name, const Partition& p) {
  return point_name + "-part" + std::to_string(p.number) + ".raw";
}
std::string latest_partition_name(const Partition& p) { return "latest-part" + std::to_string(p.number) + ".raw"; }
ViewEntry latest_partition_entry(const ManifestPtr& last, const Partition& p) {
  return {ViewEntry::Kind::Link, partition_name(format_point_name(last->time), p), nullptr, last->time};
}
ViewEntry lv_entry(const ManifestPtr& m, const std::shared_ptr<const LvImage>& lv) {
  return {ViewEntry::Kind::Image, {}, m, m->time, 0, lv->volume().size, 0, lv};
}
std::string lv_file_name(const std::string& point_name, const LvImage& lv) { return point_name + "-" + lv.name + ".raw"; }
std::string latest_lv_name(const LvImage& lv) { return "latest-" + lv.name + ".raw"; }
ViewEntry latest_lv_entry(const ManifestPtr& last, const LvImage& lv) {
  return {ViewEntry::Kind::Link, lv_file_name(format_point_name(last->time), lv), nullptr, last->time};
}
// As /dev/mapper names them: a '-' inside a name is doubled, so the one
// between the VG and the LV is unambiguous.
std::string dm_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == '-') out += '-';
  }
  return out;
}
}  // namespace

std::vector<std::pair<std::string, ViewEntry>> MountView::vdi_dir(const std::string& vdi) {
  std::vector<std::pair<std::string, ViewEntry>> out;
  auto pl = repo_->points(vdi);
  for (auto& m : pl.points) {
    std::string name = format_point_name(m->time);
    out.emplace_back(name + ".raw", image_entry(m));
    for (auto& p : partitions(m)) out.emplace_back(partition_name(name, p), partition_entry(m, p));
    for (auto& lv : volumes(m)->images) out.emplace_back(lv_file_name(name, *lv), lv_entry(m, lv));
  }
  if (!pl.points.empty()) {
    auto& last = pl.points.back();
    out.emplace_back(kLatest, latest_entry(last));
    for (auto& p : partitions(last)) out.emplace_back(latest_partition_name(p), latest_partition_entry(last, p));
    for (auto& lv : volumes(last)->images) out.emplace_back(latest_lv_name(*lv), latest_lv_entry(last, *lv));
  }
  return out;
}

// One name of a VDI's directory. Only a -partN name reads a partition table
// (an -lv- name the LVM metadata too), and only its own point's: opening
// latest.raw of a long chain must not probe every point.
std::optional<ViewEntry> MountView::vdi_entry(const std::string& vdi, const std::string& name) {
  auto pl = repo_->points(vdi);
  if (pl.points.empty()) return std::nullopt;
  if (name == kLatest) return latest_entry(pl.points.back());
  if (name.starts_with("latest-part")) {
    for (auto& p : partitions(pl.points.back()))
      if (name == latest_partition_name(p)) return latest_partition_entry(pl.points.back(), p);
    return std::nullopt;
  }
  if (name.starts_with("latest-lv-")) {
    for (auto& lv : volumes(pl.points.back())->images)
      if (name == latest_lv_name(*lv)) return latest_lv_entry(pl.points.back(), *lv);
    return std::nullopt;
  }
  for (auto& m : pl.points) {
    std::string base = format_point_name(m->time);
    if (name.compare(0, base.size(), base) != 0) continue;
    if (name == base + ".raw") return image_entry(m);
    if (name.compare(base.size(), 4, "-lv-") == 0) {
      for (auto& lv : volumes(m)->images)
        if (name == lv_file_name(base, *lv)) return lv_entry(m, lv);
      continue;
    }
    for (auto& p : partitions(m))
      if (name == partition_name(base, p)) return partition_entry(m, p);
  }
  return std::nullopt;
}

std::optional<std::vector<std::pair<std::string, ViewEntry>>> MountView::list(const std::string& path) {
  auto parts = split(path);
  std::vector<std::pair<std::string, ViewEntry>> out;
  if (parts.empty()) {
    out.emplace_back(kByName, ViewEntry{});
    for (auto& vdi : repo_->vdis())
      if (repo_->has_vdi(vdi)) out.emplace_back(vdi, ViewEntry{});
    return out;
  }
  if (parts[0] == kByName) {
    auto tree = by_name();
    if (parts.size() == 1) {
      for (auto& [vm, _] : tree) out.emplace_back(vm, ViewEntry{});
      return out;
    }
    if (parts.size() == 2) {
      auto it = tree.find(parts[1]);
      if (it == tree.end()) return std::nullopt;
      for (auto& [name, vdi] : it->second) out.emplace_back(name, ViewEntry{ViewEntry::Kind::Link, "../../" + vdi, nullptr, 0});
      return out;
    }
    return std::nullopt;
  }
  if (parts.size() == 1 && repo_->has_vdi(parts[0])) return vdi_dir(parts[0]);
  return std::nullopt;
}

std::optional<ViewEntry> MountView::lookup(const std::string& path) {
  auto parts = split(path);
  if (parts.empty()) return ViewEntry{};
  if (parts.size() == 1) {
    if (parts[0] == kByName || repo_->has_vdi(parts[0])) return ViewEntry{};
    return std::nullopt;
  }
  if (parts.size() == 2 && parts[0] != kByName) {
    if (!repo_->has_vdi(parts[0])) return std::nullopt;
    return vdi_entry(parts[0], parts[1]);
  }
  auto dir = list(path.substr(0, path.rfind('/')));
  if (!dir || parts.size() > 3) return std::nullopt;
  for (auto& [name, e] : *dir)
    if (name == parts.back()) return e;
  return std::nullopt;
}

std::vector<Partition> MountView::partitions(const ManifestPtr& m) {
  std::pair<std::string, uint32_t> key{m->vdi, m->seq};
  {
    std::lock_guard g(mu_);
    if (auto it = partitions_.find(key); it != partitions_.end()) return it->second;
  }
  std::vector<Partition> parts;
  try {
    PointReader r(repo_, m, /*keep_cached=*/false);
    parts = find_partitions(
        [&](uint64_t off, std::span<std::byte> out) {
          size_t n = off < r.size() ? r.read(off, out) : 0;
          std::fill(out.begin() + static_cast<std::ptrdiff_t>(n), out.end(), std::byte{0});
        },
        m->virtual_size);
  } catch (const std::exception&) {
    return {};  // a damaged table block: the whole image still shows, and says EIO there
  }
  std::lock_guard g(mu_);
  partitions_[key] = parts;
  return parts;
}

std::vector<LvImage::Range> LvImage::map(uint64_t offset, uint64_t length, size_t max_ranges) const {
  std::vector<Range> out;
  for (auto& p : lvm::map_lv(*vg, volume(), offset, length, max_ranges))
    out.push_back({p.lv_offset, p.length, device_offset[p.device] + p.device_offset});
  return out;
}

std::shared_ptr<const PointVolumes> MountView::volumes(const ManifestPtr& m) {
  std::pair<std::string, uint32_t> key{m->vdi, m->seq};
  {
    std::lock_guard g(mu_);
    if (auto it = volumes_.find(key); it != volumes_.end()) return it->second;
  }
  auto out = std::make_shared<PointVolumes>();
  lvm::Scan scan;
  std::vector<uint64_t> offsets{0};
  try {
    // The whole disk and each partition: a PV may be on either.
    PointReader r(repo_, m, /*keep_cached=*/false);
    auto window = [&r](uint64_t base) {
      return [&r, base](uint64_t off, std::span<std::byte> o) {
        uint64_t at = base + off;
        size_t n = at < r.size() ? r.read(at, o) : 0;
        std::fill(o.begin() + static_cast<std::ptrdiff_t>(n), o.end(), std::byte{0});
      };
    };
    std::vector<lvm::Device> devices{{window(0), m->virtual_size}};
    for (auto& p : partitions(m)) {
      devices.push_back({window(p.offset), p.size});
      offsets.push_back(p.offset);
    }
    scan = lvm::find_volume_groups(devices);
  } catch (const std::exception&) {
    return out;  // a damaged block: no volumes, and asked again next time
  }
  std::string point = m->vdi + " " + format_point_name(m->time);
  auto skip = [&](const std::string& what, const std::string& why) {
    syslog(LOG_WARNING, "%s: LV %s not shown: %s", point.c_str(), what.c_str(), why.c_str());
    if (!out->skipped.empty()) out->skipped += "; ";
    out->skipped += what + ": " + why;
  };
  for (auto& n : scan.notes) {
    syslog(LOG_WARNING, "%s: LVM: %s", point.c_str(), n.c_str());
    if (!out->notes.empty()) out->notes += "; ";
    out->notes += n;
  }
  std::map<std::string, int> vg_names;
  for (auto& g : scan.groups) ++vg_names[g.name];
  std::set<std::string> taken;
  for (auto& g : scan.groups) {
    auto vg = std::make_shared<const lvm::VolumeGroup>(g);
    // Two VGs of one name on one disk: each named with the start of its uuid too.
    std::string vg_name = g.name;
    if (vg_names[g.name] > 1) {
      vg_name += '.';
      for (char c : g.uuid.substr(0, 6)) vg_name += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
    }
    for (auto& s : g.skipped) skip(g.name + "/" + s.lv, s.reason);
    for (size_t i = 0; i < g.lvs.size(); ++i) {
      auto lv = std::make_shared<LvImage>();
      lv->name = "lv-" + dm_escape(vg_name) + "-" + dm_escape(g.lvs[i].name);
      lv->vg = vg;
      lv->index = i;
      lv->device_offset = offsets;
      if (lv->name.size() + 30 > 255) {
        skip(g.name + "/" + g.lvs[i].name, "name too long for a file");
      } else if (!taken.insert(lv->name).second) {
        skip(g.name + "/" + g.lvs[i].name, "its file name is taken by another VG's LV");
      } else {
        out->images.push_back(std::move(lv));
      }
    }
  }
  std::lock_guard g(mu_);
  if (!partitions_.count(key)) return out;  // the table could not be read: asked again next time
  return volumes_.emplace(key, out).first->second;
}

uint64_t MountView::allocated_bytes(const ViewEntry& e) {
  const Manifest& m = *e.point;
  if (e.lv) {
    std::tuple<std::string, uint32_t, std::string> key{m.vdi, m.seq, e.lv->name};
    {
      std::lock_guard g(mu_);
      if (auto it = lv_allocated_.find(key); it != lv_allocated_.end()) return it->second;
    }
    // The stripes of its segments are exactly its bytes.
    PointReader r(repo_, e.point, /*keep_cached=*/false);
    uint64_t bytes = 0;
    for (auto& a : lvm::lv_areas(*e.lv->vg, e.lv->volume())) {
      uint64_t at = e.lv->device_offset[a.device] + a.device_offset;
      uint64_t blocks = r.allocated_blocks(at / kBlockSize, (at + a.length + kBlockSize - 1) / kBlockSize);
      bytes += std::min(blocks * kBlockSize, a.length);
    }
    std::lock_guard g(mu_);
    return lv_allocated_[key] = std::min(bytes, e.size);
  }
  uint64_t first = e.offset / kBlockSize, end = (e.offset + e.size + kBlockSize - 1) / kBlockSize;
  uint64_t blocks = 0;
  if (e.partition == 0 && m.blocks_allocated) {
    blocks = *m.blocks_allocated;
  } else {
    std::tuple<std::string, uint32_t, uint64_t> key{m.vdi, m.seq, e.offset};
    {
      std::lock_guard g(mu_);
      if (auto it = allocated_.find(key); it != allocated_.end()) return it->second;
    }
    blocks = PointReader(repo_, e.point, /*keep_cached=*/false).allocated_blocks(first, end);
    std::lock_guard g(mu_);
    return allocated_[key] = std::min(blocks * kBlockSize, e.size);
  }
  return std::min(blocks * kBlockSize, e.size);
}

std::vector<std::pair<std::string, std::string>> MountView::xattrs(const ViewEntry& e) {
  const Manifest& m = *e.point;
  std::vector<std::pair<std::string, std::string>> out = {{"user.cbtfs.vdi_uuid", m.vdi},
          {"user.cbtfs.vdi_name", m.vdi_name},
          {"user.cbtfs.vm_name", m.vm_name},
          {"user.cbtfs.vm_uuid", m.vm_uuid},
          {"user.cbtfs.snapshot_uuid", m.snapshot_uuid},
          {"user.cbtfs.time", format_iso_time(m.time)},
          {"user.cbtfs.chain", std::to_string(m.chain)},
          {"user.cbtfs.seq", std::to_string(m.seq)},
          {"user.cbtfs.virtual_size", std::to_string(e.size)}};
  if (e.partition) {
    out.emplace_back("user.cbtfs.disk_size", std::to_string(m.virtual_size));
    out.emplace_back("user.cbtfs.partition", std::to_string(e.partition));
    out.emplace_back("user.cbtfs.partition_offset", std::to_string(e.offset));
  }
  if (e.lv) {
    auto& vg = *e.lv->vg;
    auto& lv = e.lv->volume();
    out.emplace_back("user.cbtfs.disk_size", std::to_string(m.virtual_size));
    out.emplace_back("user.cbtfs.lv.vg", vg.name);
    out.emplace_back("user.cbtfs.lv.vg_uuid", vg.uuid);
    out.emplace_back("user.cbtfs.lv.lv", lv.name);
    out.emplace_back("user.cbtfs.lv.uuid", lv.uuid);
    out.emplace_back("user.cbtfs.lv.segments", lvm::describe_segments(vg, lv));
    out.emplace_back("user.cbtfs.lv.metadata", "seqno " + std::to_string(vg.seqno) +
                                                   (vg.recovered ? ", an older copy: the newest fails its checksum" : ""));
  } else if (e.partition == 0) {
    auto v = volumes(e.point);
    if (!v->skipped.empty()) out.emplace_back("user.cbtfs.lvm.skipped", v->skipped);
    if (!v->notes.empty()) out.emplace_back("user.cbtfs.lvm.notes", v->notes);
  }
  return out;
}

}  // namespace cbtfs
