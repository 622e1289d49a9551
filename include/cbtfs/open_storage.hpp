// Storage by location: the one place that knows which backend a location
// names, and that a remote one is read through a local cache.
#pragma once

#include <memory>
#include <string>

#include "cbtfs/cached_storage.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs {

// s3://BUCKET[/PREFIX][?query] is an object store (cbtfs-s3(7)); anything
// else a local directory.
bool is_remote_location(const std::string& location);
// The location as it stays valid from any working directory (a daemon
// changes to "/"): a local directory's absolute path, a URL unchanged.
// Throws StorageError when a local directory cannot be resolved.
std::string absolute_location(const std::string& location);

// Makes the place of a new repository (a local directory, mode 0700) and
// opens it.
std::unique_ptr<Storage> create_storage(const std::string& location);
// Opens an existing repository's storage. Records are small and object
// store round trips are not: a remote one gets the read cache in front.
std::unique_ptr<Storage> open_storage(const std::string& location, const CacheOptions& cache = {});
// The local-directory backend alone. The directory must exist.
std::unique_ptr<Storage> open_local_storage(const std::string& root);

}  // namespace cbtfs
