// cbtfs REPO MOUNTPOINT [-f] [-o OPTIONS]: mounts a repository read-only.
// Works as a mount helper too: mount.fuse3 runs "cbtfs REPO MNT -o opts".
// Exit codes (cbtfs(1)): 0 unmounted cleanly, 1 usage, 2 repository cannot be
// opened, 3 the mount failed.
#include <fuse3/fuse.h>
#include <fuse3/fuse_lowlevel.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "cbtfs/cached_storage.hpp"
#include "cbtfs/repository.hpp"
#include "cbtfs/s3_storage.hpp"
#include "fuse_ops.hpp"

namespace {

enum ExitCode { kOk = 0, kUsage = 1, kBadRepo = 2, kMountFailed = 3 };

struct Options {
  std::string repo, mountpoint;
  unsigned mode = 0400;
  unsigned readahead_kb = 4096;
  char* cache_dir = nullptr;      // S3 only
  int overlay = 0;
  char* overlay_dir = nullptr;    // overlay=DIR; plain "overlay" keeps the writes in RAM
  unsigned cache_mb = 2048;
  int help = 0;
  int version = 0;
};

#define CBTFS_OPT(t, p) {t, offsetof(Options, p), 1}
const fuse_opt kOptions[] = {CBTFS_OPT("mode=%o", mode),      CBTFS_OPT("readahead_kb=%u", readahead_kb),
                             CBTFS_OPT("cache_dir=%s", cache_dir), CBTFS_OPT("cache_mb=%u", cache_mb),
                             CBTFS_OPT("overlay", overlay),  CBTFS_OPT("overlay=%s", overlay_dir),
                             CBTFS_OPT("-h", help),          CBTFS_OPT("--help", help),
                             CBTFS_OPT("-V", version), CBTFS_OPT("--version", version), FUSE_OPT_END};

int collect(void* data, const char* arg, int key, fuse_args*) {
  auto* o = static_cast<Options*>(data);
  if (key == FUSE_OPT_KEY_NONOPT) {
    if (o->repo.empty()) {
      o->repo = arg;
      return 0;
    }
    if (o->mountpoint.empty()) {
      o->mountpoint = arg;
      return 1;  // fuse_parse_cmdline wants it too
    }
    std::fprintf(stderr, "cbtfs: unexpected argument '%s'\n", arg);
    return -1;
  }
  return 1;
}

void usage() {
  std::printf(
      "usage: cbtfs [OPTIONS] REPO MOUNTPOINT\n"
      "Mounts a cbtfs backup repository: one directory per VDI, one read-only\n"
      "raw image per point in time.\n\n"
      "  -f                 stay in the foreground\n"
      "  -d                 debug output (implies -f)\n"
      "  -s                 single-threaded\n"
      "  -o mode=OCTAL      permission bits of the images (default 0400)\n"
      "  -o readahead_kb=N  kernel readahead of the mount (default 4096)\n"
      "  -o overlay[=DIR]   images writable; writes kept in RAM (or DIR) and thrown\n"
      "                     away at unmount; the repository is never written\n"
      "  -o cache_dir=DIR   S3 repositories: where the read cache lives (default /var/tmp)\n"
      "  -o cache_mb=N      S3 repositories: read cache size in MiB (default 2048)\n"
      "  -o allow_other     let other users in (the mode still applies)\n"
      "  -o OPTION          any other FUSE mount option\n"
      "See cbtfs(1).\n");
}

// The kernel caps a FUSE mount's readahead at 128 KiB; sequential copies
// of an image run at twice the speed or more with a larger window. The
// device number comes from mountinfo: a stat() of the mount point would wait
// for this very daemon.
void raise_readahead(const char* mountpoint, unsigned kb) {
  char real[PATH_MAX];
  if (!realpath(mountpoint, real)) return;
  std::ifstream info("/proc/self/mountinfo");
  std::string line;
  while (std::getline(info, line)) {
    std::istringstream in(line);
    std::string id, parent, dev, root, mnt;
    in >> id >> parent >> dev >> root >> mnt;
    if (mnt != real) continue;
    std::ofstream ra("/sys/class/bdi/" + dev + "/read_ahead_kb");
    ra << kb;  // best effort: needs root, harmless when refused
  }
}

std::string escape_commas(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ',' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

int main(int argc, char* argv[]) {
  fuse_args args = FUSE_ARGS_INIT(argc, argv);
  struct ArgsGuard {
    fuse_args* a;
    ~ArgsGuard() { fuse_opt_free_args(a); }
  } args_guard{&args};
  Options o;
  if (fuse_opt_parse(&args, &o, kOptions, collect) != 0) return kUsage;
  std::unique_ptr<char, decltype(&free)> cache_dir_guard(o.cache_dir, &free);  // fuse_opt strdup'ed it
  std::unique_ptr<char, decltype(&free)> overlay_dir_guard(o.overlay_dir, &free);
  if (o.overlay_dir) o.overlay = 1;
  if (o.help) {
    usage();
    return kOk;
  }
  if (o.version) {
    std::printf("cbtfs %s (FUSE %s)\n", CBTFS_VERSION, fuse_pkgversion());
    return kOk;
  }
  if (o.repo.empty() || o.mountpoint.empty()) {
    usage();
    return kUsage;
  }
  if (o.mode & ~0777u || (o.mode & 0222u)) {
    std::fprintf(stderr, "cbtfs: mode=%o: images are read-only; give read bits only (e.g. 0440)\n", o.mode);
    return kUsage;
  }

  // The fsname shows in mount(8) and df(1): an absolute path, or the URL
  // without its query (an endpoint is no secret, but it is noise there).
  std::string real = o.repo.substr(0, o.repo.find('?'));
  if (!cbtfs::is_s3_url(o.repo)) {
    char buf[PATH_MAX];
    if (!realpath(o.repo.c_str(), buf)) {
      std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", o.repo.c_str(), std::strerror(errno));
      return kBadRepo;
    }
    real = buf;
  }
  std::shared_ptr<cbtfs::Repository> repo;
  try {
    if (cbtfs::is_s3_url(o.repo)) {
      // Every read would be a round trip to the gateway without it.
      cbtfs::CacheOptions co;
      if (o.cache_dir) co.dir = o.cache_dir;
      co.size = uint64_t{o.cache_mb} << 20;
      repo = cbtfs::Repository::open(cbtfs::make_cached_storage(cbtfs::open_storage(o.repo), co));
    } else {
      repo = cbtfs::Repository::open(real);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", real.c_str(), e.what());
    return kBadRepo;
  }

  // Read-only (unless writes go to an overlay), and the kernel enforces the
  // mode bits even with allow_other.
  std::string fixed = std::string(o.overlay ? "-o" : "-oro,") + "default_permissions,fsname=" + escape_commas(real) +
                      ",subtype=cbtfs";
  fuse_opt_add_arg(&args, fixed.c_str());

  fuse_cmdline_opts cmd{};
  if (fuse_parse_cmdline(&args, &cmd) != 0) return kUsage;
  std::unique_ptr<char, decltype(&free)> mountpoint_guard(cmd.mountpoint, &free);
  if (!cmd.mountpoint) {
    usage();
    return kUsage;
  }
  openlog("cbtfs", LOG_PID | (cmd.foreground ? LOG_PERROR : 0), LOG_DAEMON);

  cbtfs::MountState st{cbtfs::MountView(repo), static_cast<mode_t>(o.mode), getuid(), getgid(), time(nullptr), o.readahead_kb, nullptr};
  if (o.overlay) st.overlay = std::make_unique<cbtfs::OverlayStore>(o.overlay_dir ? o.overlay_dir : "");
  fuse* f = fuse_new(&args, &cbtfs::fuse_operations_table(), sizeof(fuse_operations), &st);
  if (!f) return kUsage;
  int rc = kMountFailed;
  if (fuse_mount(f, cmd.mountpoint) == 0) {
    raise_readahead(cmd.mountpoint, o.readahead_kb);
    if (fuse_daemonize(cmd.foreground) == 0) {
      fuse_session* se = fuse_get_session(f);
      if (fuse_set_signal_handlers(se) == 0) {
        int err;
        if (cmd.singlethread) {
          err = fuse_loop(f);
        } else {
          fuse_loop_config* lc = fuse_loop_cfg_create();
          fuse_loop_cfg_set_clone_fd(lc, cmd.clone_fd);
          fuse_loop_cfg_set_max_threads(lc, cmd.max_threads);
          err = fuse_loop_mt(f, lc);
          fuse_loop_cfg_destroy(lc);
        }
        // A positive value is the signal (SIGTERM, SIGINT) that ended a
        // clean unmount; only a negative one is a failure.
        rc = err >= 0 ? kOk : kMountFailed;
        fuse_remove_signal_handlers(se);
      }
    }
    fuse_unmount(f);
  }
  fuse_destroy(f);
  return rc;
}
