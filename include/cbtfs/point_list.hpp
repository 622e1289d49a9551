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

// Compares the newest list with the manifests there are; what differs is
// looked at again under the VDI's lock (a writer that holds it makes this a
// warning, not a wait).
PointListCheck check_point_list(Repository& repo, const std::string& vdi);

}  // namespace cbtfs
