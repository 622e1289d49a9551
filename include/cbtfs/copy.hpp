// Copying points from one repository into another (cbtfs-repo copy): local
// or S3, format 1 or 2, either way. A point is read from its source as
// plaintext, verified, and written by a PointWriter of the destination, so
// the destination's own format, dedup and atomic commit apply: with format 2
// only blocks the destination lacks are stored, and a copy that was
// interrupted stores again only what its committed packs do not hold.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cbtfs/repository.hpp"

namespace cbtfs {

// What of a VDI of src the destination lacks: src's points newer than
// dst's latest point of that VDI, oldest first (older ones dst has, or
// pruned on purpose); and the point of src that dst's latest point is a
// copy of, when it is one (then only the blocks that differ from it are
// read).
struct CopyPlan {
  std::string vdi;
  std::vector<ManifestPtr> points;
  ManifestPtr base;     // in src, or nullptr
  size_t already = 0;   // src's points not newer than dst's latest
};
CopyPlan plan_copy(Repository& src, Repository& dst, const std::string& vdi);

struct CopiedPoint {
  Manifest manifest;  // in dst
  uint64_t bytes_read = 0;    // of src's data, verified
  uint64_t bytes_stored = 0;  // in dst
  uint64_t records_deduplicated = 0;
};

// Copies `point` of src into dst as the VDI's next point, with its time,
// names and snapshot. `base` (from plan_copy) is src's point that dst's
// latest point equals; nullptr makes every block of the point be read.
// A new chain in src (a chain break, a resize) is a new chain in dst too.
// progress(done, total) counts blocks read.
CopiedPoint copy_point(const std::shared_ptr<Repository>& src, const ManifestPtr& point, const ManifestPtr& base,
                       const std::shared_ptr<Repository>& dst, const std::string& holder,
                       const std::function<void(uint64_t, uint64_t)>& progress);

}  // namespace cbtfs
