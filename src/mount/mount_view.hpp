// The file tree a mount shows, independent of FUSE:
//   /<vdi-uuid>/<YYYY-MM-DDTHHMMSSZ>.raw   one image per point
//   /<vdi-uuid>/<...Z>-part<N>.raw          each partition of it (GPT, MBR, logical)
//   /<vdi-uuid>/<...Z>-lv-<vg>-<lv>.raw     each linear or striped LVM2 LV
//                                           (a '-' in a name doubled, as in /dev/mapper)
//   /<vdi-uuid>/latest.raw                  symlink to the newest
//   /<vdi-uuid>/latest-part<N>.raw, latest-lv-<vg>-<lv>.raw   the same for its volumes
//   /by-name/<vm name>/<vdi name>           symlink to ../../<vdi-uuid>
// Every call looks at the repository afresh (a directory listing, manifests
// from cache), so a point committed while mounted shows up at once.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <mutex>

#include "lvm.hpp"
#include "partitions.hpp"
#include "cbtfs/point_reader.hpp"

namespace cbtfs {

// A logical volume of a point: its bytes are pieces of the disk image,
// through the partitions its PVs are on.
struct LvImage {
  std::string name;  // "lv-<vg>-<lv>", as in the file names
  std::shared_ptr<const lvm::VolumeGroup> vg;
  size_t index = 0;                     // into vg->lvs
  std::vector<uint64_t> device_offset;  // where each scanned device starts on the disk
  const lvm::LogicalVolume& volume() const { return vg->lvs[index]; }
  struct Range {
    uint64_t lv_offset = 0, length = 0, disk_offset = 0;
  };
  // The disk ranges of [offset, offset + length), in order; at most max_ranges.
  std::vector<Range> map(uint64_t offset, uint64_t length, size_t max_ranges = 1u << 16) const;
};

// The LVM2 volumes of a point, found once.
struct PointVolumes {
  std::vector<std::shared_ptr<const LvImage>> images;
  std::string skipped;  // "vg/lv: reason; ..." for those not shown
  std::string notes;    // problems not tied to one LV
};

struct ViewEntry {
  enum class Kind { Dir, Image, Link };
  Kind kind = Kind::Dir;
  std::string target;  // Link
  ManifestPtr point;   // Image
  int64_t mtime = 0;  // 0: the mount time
  // Image: the bytes of the point it shows; a partition is a window on it.
  uint64_t offset = 0, size = 0;
  uint32_t partition = 0;  // 0: the whole disk
  std::shared_ptr<const LvImage> lv = nullptr;  // an LV: offset is 0, size its size, bytes through lv->map
};

// Makes a user-controlled name safe as one path component: no '/', no NUL or
// control characters, no "." or "..", valid UTF-8, at most 200 bytes.
std::string sanitize_name(const std::string& name);

class MountView {
 public:
  explicit MountView(std::shared_ptr<Repository> repo) : repo_(std::move(repo)) {}
  std::optional<ViewEntry> lookup(const std::string& path);
  // nullopt when path is not a directory.
  std::optional<std::vector<std::pair<std::string, ViewEntry>>> list(const std::string& path);
  // Bytes of an image or partition that hold data, for st_blocks: the
  // manifest's count for a whole image, else counted once and kept.
  uint64_t allocated_bytes(const ViewEntry& e);
  // user.cbtfs.* attributes of an image, partition or LV.
  std::vector<std::pair<std::string, std::string>> xattrs(const ViewEntry& e);
  // The LVs of a point (and those not shown), read once.
  std::shared_ptr<const PointVolumes> volumes(const ManifestPtr& m);
  Repository& repo() { return *repo_; }
  std::shared_ptr<Repository> repo_ptr() { return repo_; }

 private:
  // vm name -> vdi name -> uuid, sanitized and de-duplicated.
  std::map<std::string, std::map<std::string, std::string>> by_name();
  std::vector<std::pair<std::string, ViewEntry>> vdi_dir(const std::string& vdi);
  std::optional<ViewEntry> vdi_entry(const std::string& vdi, const std::string& name);
  // Points never change, so each one's table is read once.
  std::vector<Partition> partitions(const ManifestPtr& m);
  std::shared_ptr<Repository> repo_;
  std::mutex mu_;
  std::map<std::pair<std::string, uint32_t>, std::vector<Partition>> partitions_;
  std::map<std::pair<std::string, uint32_t>, std::shared_ptr<const PointVolumes>> volumes_;
  std::map<std::tuple<std::string, uint32_t, uint64_t>, uint64_t> allocated_;
  std::map<std::tuple<std::string, uint32_t, std::string>, uint64_t> lv_allocated_;
};

}  // namespace cbtfs
