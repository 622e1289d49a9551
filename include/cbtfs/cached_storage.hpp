// A local read cache in front of a remote Storage, for the mount.
// Repository objects never change once committed, so a cached range stays
// right until its object is removed (and then nobody asks for it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cbtfs/storage.hpp"

namespace cbtfs {

struct CacheOptions {
  std::string dir = "/var/tmp";        // where the (unlinked) cache file lives
  uint64_t size = uint64_t{2} << 30;   // bytes of disk at most
  uint32_t chunk = 8u << 20;           // unit of fetching and eviction
  unsigned readahead = 8;              // chunks fetched ahead of a sequential reader
  unsigned threads = 8;                // requests in flight for readahead
};

// read() goes through the cache; everything else goes straight to inner.
std::unique_ptr<Storage> make_cached_storage(std::unique_ptr<Storage> inner, const CacheOptions& options);

}  // namespace cbtfs
