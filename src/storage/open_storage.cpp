#include "cbtfs/open_storage.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "cbtfs/s3_storage.hpp"

namespace cbtfs {

bool is_remote_location(const std::string& location) { return is_s3_url(location); }

std::string absolute_location(const std::string& location) {
  if (is_remote_location(location)) return location;
  char buf[PATH_MAX];
  if (!::realpath(location.c_str(), buf)) throw StorageError(location + ": " + std::strerror(errno), errno);
  return buf;
}

std::unique_ptr<Storage> create_storage(const std::string& location) {
  if (is_remote_location(location)) return open_s3_storage(s3_config_from_url(location));
  if (::mkdir(location.c_str(), 0700) != 0 && errno != EEXIST)
    throw StorageError("cannot create " + location + ": " + std::strerror(errno), errno);
  return open_local_storage(location);
}

std::unique_ptr<Storage> open_storage(const std::string& location, const CacheOptions& cache) {
  if (!is_remote_location(location)) return open_local_storage(location);
  return make_cached_storage(open_s3_storage(s3_config_from_url(location)), cache);
}

}  // namespace cbtfs
