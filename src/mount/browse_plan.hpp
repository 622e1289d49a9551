// What cbtfs-browse does with a point, decided without touching the system:
// which files of the point's directory hold file systems (partitions,
// logical volumes, or the whole disk), what to do with each kind of file
// system blkid reports, and the state file that lets `cbtfs-browse -u`
// undo a browse, even one whose process was killed half-way.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "mount_view.hpp"

namespace cbtfs::browse {

// One file of the point that may hold a file system.
struct Target {
  std::string name;  // under DIR: "part1", "lv-vg0-root", "disk"
  std::string file;  // in the VDI's directory of the mount: "2026-11-24T030000Z-part1.raw"
};

struct Plan {
  std::string vdi;    // uuid: the directory in the mount
  std::string point;  // "2026-11-24T030000Z"
  std::string label;  // "VM/VDI name" for messages ("" when the point has no names)
  std::vector<Target> targets;
};

// The targets among the names of a VDI's directory for one point:
// <point>-partN.raw as partN (in number order), then <point>.raw as "disk"
// when there is no partition, then <point>-lv-*.raw as lv-* (by name).
// The whole disk is looked at without partitions only: with a table, its
// file systems are in the partitions (and the disk itself is no file system).
std::vector<Target> targets_of(const std::vector<std::string>& names, const std::string& point);

// Resolves VDI (a uuid, or "VM/VDI" as under by-name/) and POINT
// ("2026-11-24T030000Z", with or without ".raw", or "latest") in the
// repository. Throws UsageError naming what does not exist.
Plan plan_browse(MountView& view, const std::string& vdi_arg, const std::string& point_arg);

// What to do with a file system of the type blkid reports (TYPE=, "" when
// it found none).
struct FsAction {
  enum class Kind { Mount, Ntfs3g, Skip };
  Kind kind = Kind::Skip;
  std::string type;     // for mount -t
  std::string options;  // for mount -o
  std::string why;      // Skip: the reason, said to the user
};
FsAction classify(const std::string& blkid_type);

// `blkid -p -o export` output as a map (TYPE, UUID, LABEL, ...).
std::map<std::string, std::string> parse_blkid_export(const std::string& out);

// The state file: one "key value" line per step, appended (and synced)
// before the step is taken. Values are paths and never hold a newline.
using State = std::vector<std::pair<std::string, std::string>>;
State parse_state(const std::string& text);
std::string state_line(const std::string& key, const std::string& value);
// The value of the first line with key, "" if none.
std::string state_value(const State& s, const std::string& key);

// The private directory of a browse of dir (an absolute, canonical path):
// base/<16 hex digits of a hash of dir>. Stable, so that -u finds it again.
std::string private_dir(const std::string& base, const std::string& dir);

}  // namespace cbtfs::browse
