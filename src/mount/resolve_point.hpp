// A point named as a person names it: VDI as a uuid or "VM/VDI" (as the
// mount shows them under by-name/), POINT as "2026-11-24T030000Z" (with or
// without ".raw") or "latest". cbtfs-browse and the nbdkit plugin share it,
// so both accept exactly what the mount shows.
#pragma once

#include <string>

#include "mount_view.hpp"

namespace cbtfs {

struct ResolvedPoint {
  std::string vdi;    // uuid
  std::string point;  // "2026-11-24T030000Z"
  std::string label;  // "VM/VDI name" for messages ("" when the point has no names)
  ManifestPtr manifest;
};

// Throws UsageError naming what does not exist. Looks only at the VDI's
// manifests (and, for VM/VDI, the newest manifest of each VDI); it reads no
// partition table.
ResolvedPoint resolve_point(MountView& view, const std::string& vdi_arg, const std::string& point_arg);

}  // namespace cbtfs
