// cbtfs REPO MOUNTPOINT [-f] [-o OPTIONS]: mounts a repository read-only.
// Works as a mount helper too: mount.fuse3 runs "cbtfs REPO MNT -o opts".
// Three steps: parse the command line, open the repository, serve the mount.
// Exit codes: the table of cbtfs/exit_codes.hpp (cbtfs(1)).
#include <fuse3/fuse.h>
#include <fuse3/fuse_lowlevel.h>
#include <syslog.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "cbtfs/errors.hpp"
#include "cbtfs/exit_codes.hpp"
#include "cbtfs/open_storage.hpp"
#include "cbtfs/repository.hpp"
#include "cbtfs/size_arg.hpp"
#include "fuse/fuse_ops.hpp"
#include "mount/mount_point.hpp"

using namespace cbtfs;

namespace {

struct Options {
  std::string repo, mountpoint;
  unsigned mode = 0400;
  unsigned readahead_kb = 4096;
  char* cache_dir = nullptr;      // S3 only
  int overlay = 0;
  char* overlay_dir = nullptr;    // overlay=DIR; plain "overlay" keeps the writes in RAM
  char* overlay_max = nullptr;    // overlay_max=SIZE
  char* passphrase_file = nullptr;  // an encrypted repository's (fstab has no environment)
  char* key_file = nullptr;
  unsigned cache_mb = 2048;
  int help = 0;
  int version = 0;
  // fuse_opt strdup'ed the strings.
  ~Options() {
    free(cache_dir);
    free(overlay_dir);
    free(overlay_max);
    free(passphrase_file);
    free(key_file);
  }
};

struct Args {
  fuse_args a;
  ~Args() { fuse_opt_free_args(&a); }
};

#define CBTFS_OPT(t, p) {t, offsetof(Options, p), 1}
const fuse_opt kOptions[] = {CBTFS_OPT("mode=%o", mode),      CBTFS_OPT("readahead_kb=%u", readahead_kb),
                             CBTFS_OPT("cache_dir=%s", cache_dir), CBTFS_OPT("cache_mb=%u", cache_mb),
                             CBTFS_OPT("overlay", overlay),  CBTFS_OPT("overlay=%s", overlay_dir),
                             CBTFS_OPT("overlay_max=%s", overlay_max),
                             CBTFS_OPT("passphrase_file=%s", passphrase_file), CBTFS_OPT("key_file=%s", key_file),
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
      "  -o overlay_max=SIZE  what the overlay may hold, e.g. 512M, 4G (default: a\n"
      "                     quarter of the RAM in RAM, unlimited in a DIR)\n"
      "  -o cache_dir=DIR   S3 repositories: where the read cache lives (default /var/tmp)\n"
      "  -o cache_mb=N      S3 repositories: read cache size in MiB (default 2048)\n"
      "  -o passphrase_file=FILE, -o key_file=FILE\n"
      "                     what opens an encrypted repository (or CBTFS_PASSPHRASE_FILE,\n"
      "                     CBTFS_KEY_FILE, systemd credentials; see cbtfs-repo(1))\n"
      "  -o allow_other     let other users in (the mode still applies)\n"
      "  -o OPTION          any other FUSE mount option\n"
      "See cbtfs(1).\n");
}

// A directory option as an absolute path: the daemon changes to "/" when
// it goes to the background, after which a relative one means something else.
bool make_absolute(char*& dir, const char* option) {
  if (!dir) return true;
  char buf[PATH_MAX];
  if (!realpath(dir, buf)) {
    std::fprintf(stderr, "cbtfs: %s=%s: %s\n", option, dir, std::strerror(errno));
    return false;
  }
  free(dir);
  dir = strdup(buf);
  return dir != nullptr;
}

bool has_mount_option(const fuse_args& args, const std::string& name) {
  for (int i = 0; i < args.argc; ++i) {
    std::string a = args.argv[i];
    if (a.rfind("-o", 0) != 0) continue;
    std::istringstream opts(a.substr(2));
    for (std::string o; std::getline(opts, o, ',');)
      if (o == name) return true;
  }
  return false;
}

std::string escape_commas(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ',' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// Step 1: the command line, with the checks that need no repository and no
// mount; an exit code when there is nothing more to do (--help, a refusal).
std::optional<int> parse(Args& args, Options& o, uint64_t& overlay_max) {
  if (fuse_opt_parse(&args.a, &o, kOptions, collect) != 0) return kExitUsage;
  if (o.overlay_dir || o.overlay_max) o.overlay = 1;
  if (o.help) {
    usage();
    return kExitOk;
  }
  if (o.version) {
    std::printf("cbtfs %s (FUSE %s)\n", CBTFS_VERSION, fuse_pkgversion());
    return kExitOk;
  }
  if (o.repo.empty() || o.mountpoint.empty()) {
    usage();
    return kExitUsage;
  }
  if (o.mode & ~0777u || (o.mode & 0222u)) {
    std::fprintf(stderr, "cbtfs: mode=%o: images are read-only; give read bits only (e.g. 0440)\n", o.mode);
    return kExitUsage;
  }
  overlay_max = o.overlay_dir ? UINT64_MAX : OverlayStore::default_ram_max();
  if (o.overlay_max) {
    auto v = parse_size(o.overlay_max);
    if (!v || *v == 0) {
      std::fprintf(stderr, "cbtfs: overlay_max=%s: give a size such as 512M or 4G\n", o.overlay_max);
      return kExitUsage;
    }
    overlay_max = *v;
  }
  if (!make_absolute(o.overlay_dir, "overlay") || !make_absolute(o.cache_dir, "cache_dir")) return kExitUsage;
  if (std::string why = mount::mount_point_problem(o.mountpoint); !why.empty()) {
    std::fprintf(stderr, "cbtfs: %s\n", why.c_str());
    return kExitUsage;
  }
  return std::nullopt;
}

// Step 2: the repository, or nullptr after saying why not. fsname: what
// mount(8) and df(1) show, an absolute path or the URL without its query
// (an endpoint is no secret, but it is noise there).
std::shared_ptr<Repository> open_repository(const Options& o, std::string& fsname, int& rc) {
  rc = kExitRepo;
  // The files are read (and the process made undumpable) as the
  // environment's are, before the daemon leaves the foreground.
  if (o.passphrase_file) ::setenv("CBTFS_PASSPHRASE_FILE", o.passphrase_file, 1);
  if (o.key_file) ::setenv("CBTFS_KEY_FILE", o.key_file, 1);
  std::string where;
  try {
    where = absolute_location(o.repo);  // the daemon runs in "/"
  } catch (const StorageError& e) {
    std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", o.repo.c_str(), std::strerror(e.error_number()));
    return nullptr;
  }
  fsname = where.substr(0, where.find('?'));
  try {
    CacheOptions cache;
    if (o.cache_dir) cache.dir = o.cache_dir;
    cache.size = uint64_t{o.cache_mb} << 20;
    return Repository::open(open_storage(where, cache));
  } catch (const KeyError& e) {
    std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", fsname.c_str(), e.what());
    rc = kExitKey;
    return nullptr;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", fsname.c_str(), e.what());
    return nullptr;
  }
}

// Runs the session until the file system is unmounted.
int loop(fuse* f, const fuse_cmdline_opts& cmd) {
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
  // A positive value is the signal (SIGTERM, SIGINT) that ended a clean
  // unmount; only a negative one is a failure.
  return err >= 0 ? kExitOk : kExitFailed;
}

// Step 3: mounts, goes to the background unless -f, serves until unmounted.
int serve(Args& args, const Options& o, uint64_t overlay_max, std::shared_ptr<Repository> repo,
          const std::string& fsname) {
  // Read-only (unless writes go to an overlay), and the kernel enforces the
  // mode bits even with allow_other.
  std::string fixed = std::string(o.overlay ? "-o" : "-oro,") + "default_permissions,fsname=" + escape_commas(fsname) +
                      ",subtype=cbtfs";
  fuse_opt_add_arg(&args.a, fixed.c_str());
  fuse_cmdline_opts cmd{};
  if (fuse_parse_cmdline(&args.a, &cmd) != 0) return kExitUsage;
  std::unique_ptr<char, decltype(&free)> mountpoint_guard(cmd.mountpoint, &free);
  if (!cmd.mountpoint) {
    usage();
    return kExitUsage;
  }
  openlog("cbtfs", LOG_PID | (cmd.foreground ? LOG_PERROR : 0), LOG_DAEMON);

  MountState st{MountView(std::move(repo)), static_cast<mode_t>(o.mode), getuid(), getgid(), time(nullptr),
                o.readahead_kb, nullptr};
  if (o.overlay) st.overlay = std::make_unique<OverlayStore>(o.overlay_dir ? o.overlay_dir : "", overlay_max);
  std::unique_ptr<fuse, decltype(&fuse_destroy)> f(
      fuse_new(&args.a, &fuse_operations_table(), sizeof(fuse_operations), &st), &fuse_destroy);
  if (!f) return kExitUsage;
  if (fuse_mount(f.get(), cmd.mountpoint) != 0) {
    std::fprintf(stderr, "cbtfs: cannot mount %s at %s\n", fsname.c_str(), cmd.mountpoint);
    if (std::string hint = mount::mount_failure_hint(has_mount_option(args.a, "allow_other")); !hint.empty())
      std::fprintf(stderr, "cbtfs: hint: %s\n", hint.c_str());
    return kExitFailed;
  }
  int rc = kExitFailed;
  mount::raise_readahead(cmd.mountpoint, o.readahead_kb);
  if (fuse_daemonize(cmd.foreground) == 0) {
    fuse_session* se = fuse_get_session(f.get());
    if (fuse_set_signal_handlers(se) == 0) {
      rc = loop(f.get(), cmd);
      fuse_remove_signal_handlers(se);
    }
  }
  fuse_unmount(f.get());
  return rc;
}

}  // namespace

int main(int argc, char* argv[]) {
  Args args{FUSE_ARGS_INIT(argc, argv)};
  Options o;
  uint64_t overlay_max = 0;
  if (auto done = parse(args, o, overlay_max)) return *done;
  std::string fsname;
  int rc = kExitOk;
  auto repo = open_repository(o, fsname, rc);
  if (!repo) return rc;
  return serve(args, o, overlay_max, std::move(repo), fsname);
}
