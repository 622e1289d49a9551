// nbdkit-cbtfs-plugin: one point of a VDI as an NBD export, read-only.
//
//   nbdkit cbtfs repo=REPO vdi=VDI [point=POINT]
//
// VDI and POINT are named as cbtfs-browse names them (src/mount/resolve_point).
// The point is resolved in get_ready, before nbdkit forks, so a missing
// repository, VDI or point is an error on the terminal and nbdkit does not
// start. The serving process holds the point's claim until it exits, so
// prune keeps the point: a local repository's claim (a flock) is taken in
// get_ready and survives the fork; on S3 the claim is a lease refreshed by
// a thread, and threads do not survive fork, so there the repository is
// opened again and the claim taken in after_fork.
//
// Holes come from the point's index (extents); a block that fails its
// checksum is EIO, never data. Writes exist only through a filter
// (--filter=cow): the plugin has no pwrite, so nothing reaches the repository.

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <span>
#include <string>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"
#include "cbtfs/point_reader.hpp"
#include "cbtfs/repository.hpp"
#include "mount/mount_view.hpp"
#include "mount/resolve_point.hpp"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {

using namespace cbtfs;

// Set by config; read-only after config_complete.
std::string g_repo, g_vdi_arg, g_point_arg = "latest";

// Set by get_ready: what the arguments name.
std::string g_vdi;        // uuid
uint32_t g_seq = 0;       // the point's number in its VDI
std::string g_description;

// Set by after_fork, for the life of the serving process.
std::shared_ptr<Repository> g_repository;
std::unique_ptr<Claim> g_claim;
std::unique_ptr<PointReader> g_reader;

// Turns the exception being handled into nbdkit's error and errno.
// A damaged block is EIO; the storage's own errno when it gave one.
int fail(const char* what) {
  try {
    throw;
  } catch (const CorruptError& e) {
    nbdkit_error("cbtfs: %s: %s", what, e.what());
    nbdkit_set_error(EIO);
  } catch (const StorageError& e) {
    nbdkit_error("cbtfs: %s: %s", what, e.what());
    nbdkit_set_error(e.error_number() ? e.error_number() : EIO);
  } catch (const std::bad_alloc&) {
    nbdkit_error("cbtfs: %s: out of memory", what);
    nbdkit_set_error(ENOMEM);
  } catch (const std::exception& e) {
    nbdkit_error("cbtfs: %s: %s", what, e.what());
    nbdkit_set_error(EIO);
  } catch (...) {
    nbdkit_error("cbtfs: %s: unknown error", what);
    nbdkit_set_error(EIO);
  }
  return -1;
}

int cbtfs_config(const char* key, const char* value) {
  if (std::strcmp(key, "repo") == 0) {
    g_repo = value;
    // A relative directory is relative to where nbdkit was started, not to
    // / where it runs once it is a daemon.
    if (!g_repo.starts_with("s3://")) {
      char* abs = nbdkit_absolute_path(value);
      if (!abs) return -1;
      g_repo = abs;
      std::free(abs);
    }
  } else if (std::strcmp(key, "vdi") == 0) {
    g_vdi_arg = value;
  } else if (std::strcmp(key, "point") == 0) {
    g_point_arg = *value ? value : "latest";
  } else {
    nbdkit_error("cbtfs: unknown parameter '%s' (repo=, vdi=, point=)", key);
    return -1;
  }
  return 0;
}

int cbtfs_config_complete() {
  if (g_repo.empty() || g_vdi_arg.empty()) {
    nbdkit_error("cbtfs: repo= and vdi= are required: nbdkit cbtfs repo=REPO vdi=VDI [point=POINT]");
    return -1;
  }
  return 0;
}

// The repository, the point's claim and the reader, for serving.
int hold(std::shared_ptr<Repository> repo) {
  g_repository = std::move(repo);
  auto m = g_repository->manifest(g_vdi, g_seq);
  if (m) g_claim = g_repository->hold_point(*m);
  if (!m || !g_claim) {
    nbdkit_error("cbtfs: point %s of VDI %s was removed before the export started", g_point_arg.c_str(),
                 g_vdi.c_str());
    return -1;
  }
  g_reader = std::make_unique<PointReader>(g_repository, m);
  return 0;
}

bool on_s3() { return g_repo.starts_with("s3://"); }

// Opens the repository and resolves VDI and POINT: the errors a person
// can fix, said before nbdkit forks or listens.
int cbtfs_get_ready() {
  try {
    auto repo = Repository::open(g_repo);
    MountView view(repo);
    auto r = resolve_point(view, g_vdi_arg, g_point_arg);
    g_vdi = r.vdi;
    g_seq = r.manifest->seq;
    g_description = (r.label.empty() ? r.vdi : r.label + " (" + r.vdi + ")") + " at " + r.point;
    nbdkit_debug("cbtfs: serving %s, point %u, %llu bytes", g_description.c_str(), g_seq,
                 static_cast<unsigned long long>(r.manifest->virtual_size));
    return on_s3() ? 0 : hold(repo);
  } catch (const UsageError& e) {
    nbdkit_error("cbtfs: %s", e.what());
    return -1;
  } catch (...) {
    return fail(("cannot open repository " + g_repo).c_str());
  }
}

int cbtfs_after_fork() {
  if (g_reader) return 0;  // local: held since get_ready
  try {
    return hold(Repository::open(g_repo));
  } catch (...) {
    return fail(("cannot open repository " + g_repo).c_str());
  }
}

void cbtfs_unload() {
  g_reader.reset();
  g_claim.reset();
  g_repository.reset();
}

// Every connection reads the same point through the one reader.
void* cbtfs_open(int /*readonly*/) { return g_reader.get(); }

void cbtfs_close(void*) {}

int64_t cbtfs_get_size(void*) { return static_cast<int64_t>(g_reader->size()); }

const char* cbtfs_export_description(void*) { return g_description.c_str(); }

// A point never changes, so every connection sees the same bytes.
int cbtfs_can_multi_conn(void*) { return 1; }

int cbtfs_is_rotational(void*) { return 0; }

int cbtfs_pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
  try {
    auto* out = static_cast<std::byte*>(buf);
    size_t done = 0;
    while (done < count) {
      size_t n = g_reader->read(offset + done, std::span<std::byte>(out + done, count - done));
      if (n == 0) {  // nbdkit never asks past the end; should it, the rest is not ours
        nbdkit_error("cbtfs: read past the end of the point at %llu",
                     static_cast<unsigned long long>(offset + done));
        nbdkit_set_error(EIO);
        return -1;
      }
      done += n;
    }
    return 0;
  } catch (...) {
    return fail("read");
  }
}

int cbtfs_can_extents(void*) { return 1; }

// Data and holes from the index: a hole (no data in the index: never
// written, or all zeros) reads as zeros.
int cbtfs_extents(void*, uint32_t count, uint64_t offset, uint32_t flags, struct nbdkit_extents* extents) {
  try {
    const uint64_t size = g_reader->size();
    const uint64_t end = std::min<uint64_t>(offset + count, size);
    const bool one = flags & NBDKIT_FLAG_REQ_ONE;
    uint64_t pos = offset;
    while (pos < end) {
      uint64_t data = std::min(g_reader->next_data(pos), size);
      if (data > pos) {
        if (nbdkit_add_extent(extents, pos, std::min(data, end) - pos, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1)
          return -1;
        pos = data;
        if (one) break;
      }
      if (pos >= end) break;
      uint64_t hole = std::min(g_reader->next_hole(pos), size);
      if (hole <= pos) hole = std::min(pos + kBlockSize, size);  // never stall: the library promised progress
      if (nbdkit_add_extent(extents, pos, std::min(hole, end) - pos, 0) == -1) return -1;
      pos = hole;
      if (one) break;
    }
    return 0;
  } catch (...) {
    return fail("extents");
  }
}

// NBD_CMD_CACHE: loads the index nodes of the range into the repository's
// node cache (cheap: at most a few nodes per 64 MiB). Data blocks are not
// kept: a local repository's packs are in the page cache already.
int cbtfs_can_cache(void*) { return NBDKIT_CACHE_NATIVE; }

int cbtfs_cache(void*, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
  try {
    uint64_t first = offset / kBlockSize;
    uint64_t end = (std::min<uint64_t>(offset + count, g_reader->size()) + kBlockSize - 1) / kBlockSize;
    if (first < end) g_reader->allocated_blocks(first, end);
    return 0;
  } catch (...) {
    return fail("cache");
  }
}

void cbtfs_dump_plugin() {
  std::printf("cbtfs_version=%s\n", CBTFS_VERSION);
  std::fflush(stdout);
}

struct nbdkit_plugin make_plugin() {
  struct nbdkit_plugin p;
  std::memset(&p, 0, sizeof p);
  p.name = "cbtfs";
  p.longname = "cbtfs backup point";
  p.version = CBTFS_VERSION;
  p.description = "A point of a cbtfs backup repository, read-only";
  p.unload = cbtfs_unload;
  p.config = cbtfs_config;
  p.config_complete = cbtfs_config_complete;
  p.config_help =
      "repo=<DIR|s3://BUCKET/PREFIX>  (required) The repository.\n"
      "vdi=<UUID|VM/VDI>              (required) The VDI, as under by-name/ of the mount.\n"
      "point=<POINT|latest>           The point, e.g. 2026-11-24T030000Z (default: latest).";
  p.get_ready = cbtfs_get_ready;
  p.after_fork = cbtfs_after_fork;
  p.open = cbtfs_open;
  p.close = cbtfs_close;
  p.get_size = cbtfs_get_size;
  p.export_description = cbtfs_export_description;
  p.can_multi_conn = cbtfs_can_multi_conn;
  p.is_rotational = cbtfs_is_rotational;
  p.pread = cbtfs_pread;
  p.can_extents = cbtfs_can_extents;
  p.extents = cbtfs_extents;
  p.can_cache = cbtfs_can_cache;
  p.cache = cbtfs_cache;
  p.dump_plugin = cbtfs_dump_plugin;
  return p;
}

struct nbdkit_plugin plugin = make_plugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
