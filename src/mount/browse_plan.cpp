#include "browse_plan.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <sstream>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"
#include "resolve_point.hpp"

namespace cbtfs::browse {

namespace {

bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

std::vector<Target> targets_of(const std::vector<std::string>& names, const std::string& point) {
  std::vector<std::pair<unsigned long, Target>> parts;
  std::vector<Target> lvs;
  const std::string prefix = point + "-", suffix = ".raw";
  for (auto& n : names) {
    if (n.size() <= prefix.size() + suffix.size() || !n.starts_with(prefix) || !n.ends_with(suffix)) continue;
    std::string mid = n.substr(prefix.size(), n.size() - prefix.size() - suffix.size());
    if (mid.starts_with("part") && all_digits(mid.substr(4)) && mid.size() <= 4 + 9)
      parts.push_back({std::stoul(mid.substr(4)), Target{mid, n}});
    else if (mid.starts_with("lv-") && mid.size() > 3)
      lvs.push_back(Target{mid, n});
  }
  std::sort(parts.begin(), parts.end(), [](auto& a, auto& b) { return a.first < b.first; });
  std::sort(lvs.begin(), lvs.end(), [](auto& a, auto& b) { return a.name < b.name; });
  std::vector<Target> out;
  for (auto& [_, t] : parts) out.push_back(t);
  if (parts.empty() && std::find(names.begin(), names.end(), point + suffix) != names.end())
    out.push_back(Target{"disk", point + suffix});
  out.insert(out.end(), lvs.begin(), lvs.end());
  return out;
}

Plan plan_browse(MountView& view, const std::string& vdi_arg, const std::string& point_arg) {
  auto r = resolve_point(view, vdi_arg, point_arg);
  Plan plan;
  plan.vdi = r.vdi;
  plan.point = r.point;
  plan.label = r.label;
  auto listing = view.list("/" + plan.vdi);
  if (!listing) throw UsageError("no VDI " + plan.vdi + " in the repository");
  std::vector<std::string> names;
  for (auto& [n, _] : *listing) names.push_back(n);
  plan.targets = targets_of(names, plan.point);
  return plan;
}

FsAction classify(const std::string& t) {
  using K = FsAction::Kind;
  // Never setuid programs or device files out of a backup: it is the
  // guest's data, not this machine's.
  const std::string ro = "ro,nosuid,nodev";
  if (t == "ext2" || t == "ext3" || t == "ext4" || t == "btrfs" || t == "vfat" || t == "exfat")
    return {K::Mount, t, ro, ""};
  // XFS refuses a second file system with a uuid it has mounted: two points
  // of one disk, or a clone, share it.
  if (t == "xfs") return {K::Mount, t, ro + ",nouuid", ""};
  if (t == "ntfs") return {K::Ntfs3g, t, "", ""};
  if (t == "crypto_LUKS")
    return {K::Skip, t, "", "encrypted (LUKS): not opened; to read it: cryptsetup open --readonly FILE NAME"};
  if (t == "BitLocker") return {K::Skip, t, "", "encrypted (BitLocker): not opened"};
  if (t == "LVM2_member")
    return {K::Skip, t, "", "LVM physical volume: its logical volumes are browsed as lv-<vg>-<lv>"};
  if (t == "zfs_member") return {K::Skip, t, "", "ZFS pool member: ZFS is not supported"};
  if (t == "refs") return {K::Skip, t, "", "ReFS: Linux has no driver for it"};
  if (t == "swap") return {K::Skip, t, "", "swap space: no files"};
  if (t == "linux_raid_member" || t == "isw_raid_member" || t == "ddf_raid_member")
    return {K::Skip, t, "", "RAID member: arrays are not assembled"};
  if (t.empty()) return {K::Skip, t, "", "no file system found (empty, unknown or damaged)"};
  return {K::Skip, t, "", "file system type " + t + " is not supported by cbtfs-browse"};
}

std::map<std::string, std::string> parse_blkid_export(const std::string& out) {
  std::map<std::string, std::string> m;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    auto eq = line.find('=');
    if (eq == std::string::npos || eq == 0) continue;
    m[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return m;
}

State parse_state(const std::string& text) {
  State s;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    auto sp = line.find(' ');
    if (sp == std::string::npos) s.emplace_back(line, "");
    else s.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }
  return s;
}

std::string state_line(const std::string& key, const std::string& value) {
  if (value.find('\n') != std::string::npos) throw UsageError("a path with a newline: " + value);
  return key + " " + value + "\n";
}

std::string state_value(const State& s, const std::string& key) {
  for (auto& [k, v] : s)
    if (k == key) return v;
  return {};
}

std::string private_dir(const std::string& base, const std::string& dir) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a: stable across builds and runs
  for (unsigned char c : dir) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return base + "/" + hex;
}

}  // namespace cbtfs::browse
