// FUSE callbacks. Points are immutable, so images are cached by the kernel
// (keep_cache) and reads need no locking beyond the caches' own.
#include "fuse_ops.hpp"

#include <sys/xattr.h>
#include <syslog.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "cbtfs/errors.hpp"
#include "mount/image_file.hpp"

namespace cbtfs {
namespace {

thread_local MountState* scoped_state = nullptr;  // see CallbackScope

MountState& state() {
  if (scoped_state) return *scoped_state;
  return *static_cast<MountState*>(fuse_get_context()->private_data);
}

// One translation from exceptions to errno for every callback. The result
// keeps the callback's own type: lseek answers 64-bit offsets.
template <typename F>
auto guarded(const char* verb, const char* path, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const CorruptError& e) {
    syslog(LOG_ERR, "Cannot %s %s: %s", verb, path ? path : "?", e.what());
    return -EIO;
  } catch (const StorageError& e) {
    syslog(LOG_ERR, "Cannot %s %s: %s", verb, path ? path : "?", e.what());
    return e.error_number() == ENOSPC || e.error_number() == EACCES ? -e.error_number() : -EIO;
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  } catch (const std::exception& e) {
    syslog(LOG_ERR, "Cannot %s %s: %s", verb, path ? path : "?", e.what());
    return -EIO;
  }
}

mode_t dir_mode(mode_t image_mode) {
  // A directory is searchable by whoever may read the images in it.
  mode_t m = 0500;
  if (image_mode & 0040) m |= 0050;
  if (image_mode & 0004) m |= 0005;
  return m;
}

// with_blocks=false for a listing: the kernel takes only the type from it.
void fill_stat(const ViewEntry& e, struct stat* st, bool with_blocks = true) {
  auto& s = state();
  std::memset(st, 0, sizeof *st);
  st->st_uid = s.uid;
  st->st_gid = s.gid;
  st->st_mtim.tv_sec = st->st_ctim.tv_sec = st->st_atim.tv_sec = e.mtime ? e.mtime : s.mount_time;
  switch (e.kind) {
    case ViewEntry::Kind::Dir:
      st->st_mode = S_IFDIR | dir_mode(s.image_mode);
      st->st_nlink = 2;
      break;
    case ViewEntry::Kind::Image:
      st->st_mode = S_IFREG | s.image_mode | (s.overlay ? S_IWUSR : 0);
      st->st_nlink = 1;
      st->st_size = static_cast<off_t>(e.size);
      st->st_blksize = kBlockSize;
      // Only blocks holding data count: cp, tar -S and du decide sparseness
      // from st_blocks.
      if (with_blocks) st->st_blocks = static_cast<blkcnt_t>((s.view.allocated_bytes(e) + 511) / 512);
      break;
    case ViewEntry::Kind::Link:
      st->st_mode = S_IFLNK | 0777;
      st->st_nlink = 1;
      st->st_size = static_cast<off_t>(e.target.size());
      break;
  }
}

struct OpenImage {
  ImageFile file;
  std::unique_ptr<Claim> hold;  // prune keeps the point while it is open
};

OpenImage* image_of(fuse_file_info* fi) { return reinterpret_cast<OpenImage*>(fi->fh); }

void* op_init(fuse_conn_info* conn, fuse_config* cfg) {
  // Names can appear (new points) but never change meaning, and image
  // contents never change at all.
  cfg->entry_timeout = 1;
  cfg->attr_timeout = 1;
  cfg->negative_timeout = 0;
  cfg->kernel_cache = 1;
  conn->max_write = 1 << 20;  // also raises max_pages, hence the largest read
  auto* st = static_cast<MountState*>(fuse_get_context()->private_data);
  if (st->overlay) {
    // A point shows as several files (the image, its partitions): a write
    // through one must be seen through the others, so no page cache.
    cfg->kernel_cache = 0;
    cfg->direct_io = 1;
  }
  conn->max_readahead = st->readahead_kb * 1024;
  return st;
}

int op_getattr(const char* path, struct stat* st, fuse_file_info* fi) {
  return guarded("stat", path, [&] {
    if (fi && fi->fh) {
      fill_stat(image_of(fi)->file.entry(), st);
      return 0;
    }
    auto e = state().view.lookup(path);
    if (!e) return -ENOENT;
    fill_stat(*e, st);
    return 0;
  });
}

int op_readlink(const char* path, char* buf, size_t size) {
  return guarded("read link", path, [&] {
    auto e = state().view.lookup(path);
    if (!e) return -ENOENT;
    if (e->kind != ViewEntry::Kind::Link) return -EINVAL;
    if (size == 0) return -EINVAL;
    size_t n = std::min(size - 1, e->target.size());
    std::memcpy(buf, e->target.data(), n);
    buf[n] = '\0';
    return 0;
  });
}

int op_readdir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info*, fuse_readdir_flags) {
  return guarded("list", path, [&] {
    auto entries = state().view.list(path);
    if (!entries) return state().view.lookup(path) ? -ENOTDIR : -ENOENT;
    fill(buf, ".", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    fill(buf, "..", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    for (auto& [name, e] : *entries) {
      struct stat st;
      fill_stat(e, &st, /*with_blocks=*/false);
      if (fill(buf, name.c_str(), &st, 0, static_cast<fuse_fill_dir_flags>(0))) break;
    }
    return 0;
  });
}

int op_open(const char* path, fuse_file_info* fi) {
  return guarded("open", path, [&] {
    auto& s = state();
    if ((fi->flags & O_ACCMODE) != O_RDONLY && !s.overlay) return -EROFS;
    auto e = s.view.lookup(path);
    if (!e) return -ENOENT;
    if (e->kind != ViewEntry::Kind::Image) return -EISDIR;
    auto hold = s.view.repo().hold_point(*e->point);
    if (!hold) return -ENOENT;  // pruned since it was looked up
    auto overlay = s.overlay ? s.overlay->of(*e->point) : nullptr;
    fi->fh = reinterpret_cast<uint64_t>(
        new OpenImage{ImageFile(*e, PointReader(s.view.repo_ptr(), e->point), overlay), std::move(hold)});
    fi->keep_cache = !overlay;
    fi->direct_io = overlay != nullptr;
    return 0;
  });
}

int op_read(const char* path, char* buf, size_t size, off_t off, fuse_file_info* fi) {
  auto& file = image_of(fi)->file;
  return guarded("read", path ? path : file.entry().point->vdi.c_str(), [&] {
    if (off < 0) return -EINVAL;
    return static_cast<int>(file.read(static_cast<uint64_t>(off), {reinterpret_cast<std::byte*>(buf), size}));
  });
}

int op_write(const char* path, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  return guarded("write", path, [&] {
    auto& file = image_of(fi)->file;
    if (!file.writable()) return -EROFS;
    if (off < 0) return -EINVAL;
    auto pos = static_cast<uint64_t>(off);
    if (pos >= file.size()) return size ? -ENOSPC : 0;  // an image cannot grow
    size = static_cast<size_t>(std::min<uint64_t>(size, file.size() - pos));
    file.write(pos, {reinterpret_cast<const std::byte*>(buf), size});
    return static_cast<int>(size);
  });
}

// Images keep their size; truncating to it (as some tools do) is no change.
int op_truncate(const char* path, off_t size, fuse_file_info* fi) {
  return guarded("truncate", path, [&] {
    if (!state().overlay) return -EROFS;
    uint64_t have = 0;
    if (fi && fi->fh) {
      have = image_of(fi)->file.size();
    } else {
      auto e = state().view.lookup(path);
      if (!e) return -ENOENT;
      if (e->kind != ViewEntry::Kind::Image) return -EISDIR;
      have = e->size;
    }
    return static_cast<uint64_t>(size) == have ? 0 : -EPERM;
  });
}

// Overlay writes are thrown away at unmount by design: nothing to make durable.
int op_fsync(const char*, int, fuse_file_info*) { return 0; }
int op_flush(const char*, fuse_file_info*) { return 0; }

int op_release(const char*, fuse_file_info* fi) {
  delete image_of(fi);
  return 0;
}

off_t op_lseek(const char* path, off_t off, int whence, fuse_file_info* fi) {
  return guarded("seek in", path, [&]() -> off_t {
    auto& file = image_of(fi)->file;
    if (off < 0 || (whence != SEEK_DATA && whence != SEEK_HOLE)) return -EINVAL;
    auto pos = static_cast<uint64_t>(off);
    if (pos >= file.size()) return -ENXIO;
    auto found = file.seek(pos, whence == SEEK_DATA);
    return found ? static_cast<off_t>(*found) : -ENXIO;
  });
}

int op_getxattr(const char* path, const char* name, char* value, size_t size) {
  return guarded("read attributes of", path, [&] {
    auto e = state().view.lookup(path);
    if (!e) return -ENOENT;
    if (e->kind != ViewEntry::Kind::Image) return -ENODATA;
    for (auto& [k, v] : state().view.xattrs(*e)) {
      if (k != name) continue;
      if (size == 0) return static_cast<int>(v.size());
      if (size < v.size()) return -ERANGE;
      std::memcpy(value, v.data(), v.size());
      return static_cast<int>(v.size());
    }
    return -ENODATA;
  });
}

int op_listxattr(const char* path, char* list, size_t size) {
  return guarded("list attributes of", path, [&] {
    auto e = state().view.lookup(path);
    if (!e) return -ENOENT;
    std::string all;
    if (e->kind == ViewEntry::Kind::Image)
      for (auto& [k, v] : state().view.xattrs(*e)) all.append(k).push_back('\0');
    if (size == 0) return static_cast<int>(all.size());
    if (size < all.size()) return -ERANGE;
    std::memcpy(list, all.data(), all.size());
    return static_cast<int>(all.size());
  });
}

fuse_operations make_table() {
  fuse_operations ops{};
  ops.init = op_init;
  ops.getattr = op_getattr;
  ops.readlink = op_readlink;
  ops.readdir = op_readdir;
  ops.open = op_open;
  ops.read = op_read;
  ops.write = op_write;
  ops.truncate = op_truncate;
  ops.fsync = op_fsync;
  ops.flush = op_flush;
  ops.release = op_release;
  ops.lseek = op_lseek;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  return ops;
}

}  // namespace

CallbackScope::CallbackScope(MountState& state) { scoped_state = &state; }
CallbackScope::~CallbackScope() { scoped_state = nullptr; }

const fuse_operations& fuse_operations_table() {
  static const fuse_operations ops = make_table();
  return ops;
}

}  // namespace cbtfs
