// Retention: which points to keep, and removing the others.
//
// Removing a point deletes its manifest; what it stored stays as long as a
// remaining point shares it (every point has its own complete index, so
// nothing has to be merged for the others to stay bit-identical). A pack
// that no remaining point needs is deleted. Each step leaves a valid
// repository: a crash anywhere loses nothing that remains, and a re-run
// finishes the job.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cbtfs/repository.hpp"

namespace cbtfs {

struct RetentionPolicy {
  int last = 0, hourly = 0, daily = 0, weekly = 0, monthly = 0, yearly = 0;
  bool any() const { return last || hourly || daily || weekly || monthly || yearly; }
};

// For point times (UTC seconds, oldest first): which to keep. The newest is
// always kept. Like restic/borg: each rule keeps the newest point of each
// of the last N hours/days/ISO weeks/months/years that have points.
std::vector<bool> select_kept(const std::vector<int64_t>& times, const RetentionPolicy& policy);

struct PruneReport {
  std::vector<std::string> removed;  // image names
  std::vector<std::string> kept;
  std::vector<std::string> in_use;  // would go, but a reader has it open: kept until a later prune
  uint64_t packs_deleted = 0;
  uint64_t bytes_freed = 0;
  uint64_t bytes_dead = 0;  // in packs that remaining points still partly need
  // Format 2: the removed points' blocks are in the shared store, where
  // other VDIs' points may use them; a collection of the whole store
  // (gc.hpp) frees what no point needs any more.
  bool store_not_collected = false;
};

// Holds the VDI's writer lock while it works (throws LockedError).
PruneReport prune_vdi(std::shared_ptr<Repository> repo, const std::string& vdi, const RetentionPolicy& policy,
                      bool dry_run, const std::string& holder);
// Removes every point and pack of a VDI, then the VDI itself.
void forget_vdi(std::shared_ptr<Repository> repo, const std::string& vdi, const std::string& holder);

}  // namespace cbtfs
