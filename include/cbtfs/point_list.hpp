// An encrypted repository's sealed list of each VDI's points: which points
// exist, as the writer that last changed them left them. Every manifest is
// sealed on its own, so without it someone who can write the storage could
// remove the newest point, or put back a pruned one, and each manifest
// would still open. The writers (a commit, a prune) write the next
// generation while they hold the VDI's lock; verify compares the newest
// with the manifests there are.
//
// It catches what is done behind cbtfs's back between its own writes; a
// rollback of everything (lists, manifests and all) to an earlier state is
// a repository that is old, not one that is wrong, and no stored object
// can tell them apart.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "cbtfs/repository.hpp"

namespace cbtfs {

struct PointListCheck {
  std::vector<std::string> problems;  // points removed, or put back, behind cbtfs's back
  std::vector<std::string> warnings;  // no list yet, or the VDI is being written
};

// Writes the next generation of the VDI's list from the manifests there are
// now, then removes the older ones. The caller holds the VDI's lock. Does
// nothing in a plain repository.
void write_point_list(Repository& repo, const std::string& vdi);

// What the newest list says, for the readers (the mount, ls, restore).
struct ListedPoints {
  std::set<uint32_t> points;
  uint32_t highest = 0;  // the highest point number used when it was written
  // A manifest the list does not name, numbered at most the highest, was
  // removed by a prune and put back by something other than cbtfs. One
  // numbered past it was committed after the list (or by a backup that
  // died before writing its list): it stands.
  bool allows(uint32_t seq) const { return seq > highest || points.count(seq) > 0; }
};

// The VDI's newest list. nullopt in a plain repository, for a VDI whose
// points an older cbtfs wrote (no list yet), or when the list does not open:
// verify names that, and the readers go on without it.
std::optional<ListedPoints> read_listed_points(Repository& repo, const std::string& vdi);

// Compares the newest list with the manifests there are; what differs is
// looked at again under the VDI's lock (a writer that holds it makes this a
// warning, not a wait).
PointListCheck check_point_list(Repository& repo, const std::string& vdi);

}  // namespace cbtfs
