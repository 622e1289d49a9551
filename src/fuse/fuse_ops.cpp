// FUSE callbacks. Points are immutable, so images are cached by the kernel
// (keep_cache) and reads need no locking beyond the caches' own.
#include "fuse_ops.hpp"

#include <sys/xattr.h>
#include <syslog.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "cbtfs/errors.hpp"

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

// An image, or a partition: the window [offset, offset + size) of a point.
struct OpenImage {
  ViewEntry entry;
  PointReader reader;
  std::shared_ptr<PointOverlay> overlay;  // with -o overlay: shared by every file of the point
  std::unique_ptr<Claim> hold;            // prune keeps the point while it is open
};

OpenImage* image_of(fuse_file_info* fi) { return reinterpret_cast<OpenImage*>(fi->fh); }

// Reads [pos, pos + out.size()) of an image: a window of the point, or the
// pieces of an LV.
size_t read_image(OpenImage& img, uint64_t pos, std::span<std::byte> out) {
  auto read_at = [&](uint64_t at, std::span<std::byte> o) {
    return img.overlay ? img.overlay->read(img.reader, at, o) : img.reader.read(at, o);
  };
  if (!img.entry.lv) return read_at(img.entry.offset + pos, out);
  size_t done = 0;
  for (auto& r : img.entry.lv->map(pos, out.size())) {
    auto part = out.subspan(static_cast<size_t>(r.lv_offset - pos), static_cast<size_t>(r.length));
    size_t n = read_at(r.disk_offset, part);
    std::fill(part.begin() + static_cast<std::ptrdiff_t>(n), part.end(), std::byte{0});  // cannot be short: checked
    done = static_cast<size_t>(r.lv_offset - pos + r.length);
  }
  return done;
}

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
      fill_stat(image_of(fi)->entry, st);
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
        new OpenImage{*e, PointReader(s.view.repo_ptr(), e->point), overlay, std::move(hold)});
    fi->keep_cache = !overlay;
    fi->direct_io = overlay != nullptr;
    return 0;
  });
}

int op_read(const char* path, char* buf, size_t size, off_t off, fuse_file_info* fi) {
  return guarded("read", path ? path : image_of(fi)->reader.point().vdi.c_str(), [&] {
    if (off < 0) return -EINVAL;
    auto& img = *image_of(fi);
    auto pos = static_cast<uint64_t>(off);
    if (pos >= img.entry.size) return 0;
    size = static_cast<size_t>(std::min<uint64_t>(size, img.entry.size - pos));
    std::span<std::byte> out{reinterpret_cast<std::byte*>(buf), size};
    return static_cast<int>(read_image(img, pos, out));
  });
}

int op_write(const char* path, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  return guarded("write", path, [&] {
    auto& img = *image_of(fi);
    if (!img.overlay) return -EROFS;
    if (off < 0) return -EINVAL;
    auto pos = static_cast<uint64_t>(off);
    if (pos >= img.entry.size) return size ? -ENOSPC : 0;  // an image cannot grow
    size = static_cast<size_t>(std::min<uint64_t>(size, img.entry.size - pos));
    std::span<const std::byte> data{reinterpret_cast<const std::byte*>(buf), size};
    if (!img.entry.lv) {
      img.overlay->write(img.reader, img.entry.offset + pos, data);
    } else {
      for (auto& r : img.entry.lv->map(pos, size))
        img.overlay->write(img.reader, r.disk_offset,
                           data.subspan(static_cast<size_t>(r.lv_offset - pos), static_cast<size_t>(r.length)));
    }
    return static_cast<int>(size);
  });
}

// Images keep their size; truncating to it (as some tools do) is no change.
int op_truncate(const char* path, off_t size, fuse_file_info* fi) {
  return guarded("truncate", path, [&] {
    if (!state().overlay) return -EROFS;
    uint64_t have = 0;
    if (fi && fi->fh) {
      have = image_of(fi)->entry.size;
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
    auto& img = *image_of(fi);
    auto& r = img.reader;
    if (off < 0) return -EINVAL;
    auto pos = static_cast<uint64_t>(off);
    if (whence != SEEK_DATA && whence != SEEK_HOLE) return -EINVAL;
    if (pos >= img.entry.size) return -ENXIO;
    // Written pages are data wherever they are: no holes are claimed.
    if (img.overlay && img.overlay->written()) return whence == SEEK_DATA ? off : static_cast<off_t>(img.entry.size);
    if (img.entry.lv) {
      // Piece by piece, up to a budget (a striped LV has one per chunk);
      // past it, everything counts as data, which is never wrong to claim.
      constexpr size_t kBudget = 4096;
      auto ranges = img.entry.lv->map(pos, img.entry.size - pos, kBudget);
      for (auto& rg : ranges) {
        uint64_t end = rg.disk_offset + rg.length;
        uint64_t f = std::min(whence == SEEK_DATA ? r.next_data(rg.disk_offset) : r.next_hole(rg.disk_offset), end);
        if (f < end) return static_cast<off_t>(rg.lv_offset + (f - rg.disk_offset));
      }
      uint64_t seen = ranges.empty() ? pos : ranges.back().lv_offset + ranges.back().length;
      if (whence == SEEK_HOLE) return static_cast<off_t>(img.entry.size);
      if (seen >= img.entry.size) return -ENXIO;
      return static_cast<off_t>(seen);
    }
    uint64_t at = img.entry.offset + pos, end = img.entry.offset + img.entry.size;
    uint64_t found = std::min(whence == SEEK_DATA ? r.next_data(at) : r.next_hole(at), end);
    if (whence == SEEK_DATA && found >= end) return -ENXIO;
    return static_cast<off_t>(found - img.entry.offset);
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
