// The file tree a mount shows, independent of FUSE:
//   /<vdi-uuid>/<YYYY-MM-DDTHHMMSSZ>.raw   one image per point
//   /<vdi-uuid>/<...Z>-part<N>.raw          each partition of it (GPT, MBR, logical)
//   /<vdi-uuid>/latest.raw                  symlink to the newest
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

#include "partitions.hpp"
#include "cbtfs/point_reader.hpp"

namespace cbtfs {

struct ViewEntry {
  enum class Kind { Dir, Image, Link };
  Kind kind = Kind::Dir;
  std::string target;  // Link
  ManifestPtr point;   // Image
  int64_t mtime = 0;  // 0: the mount time
  // Image: the bytes of the point it shows; a partition is a window on it.
  uint64_t offset = 0, size = 0;
  uint32_t partition = 0;  // 0: the whole disk
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
  // user.cbtfs.* attributes of an image or partition.
  static std::vector<std::pair<std::string, std::string>> xattrs(const ViewEntry& e);
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
  std::map<std::tuple<std::string, uint32_t, uint64_t>, uint64_t> allocated_;
};

}  // namespace cbtfs
