// cbtfs REPO MOUNTPOINT [-f] [-o OPTIONS]: mounts a repository read-only.
// Works as a mount helper too: mount.fuse3 runs "cbtfs REPO MNT -o opts".
// Exit codes: the table of cbtfs/exit_codes.hpp (cbtfs(1)).
#include <fuse3/fuse.h>
#include <fuse3/fuse_lowlevel.h>
#include <pwd.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <cctype>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "cbtfs/cached_storage.hpp"
#include "cbtfs/exit_codes.hpp"
#include "cbtfs/repository.hpp"
#include "cbtfs/s3_storage.hpp"
#include "cbtfs/size_arg.hpp"
#include "fuse_ops.hpp"

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
  unsigned cache_mb = 2048;
  int help = 0;
  int version = 0;
};

#define CBTFS_OPT(t, p) {t, offsetof(Options, p), 1}
const fuse_opt kOptions[] = {CBTFS_OPT("mode=%o", mode),      CBTFS_OPT("readahead_kb=%u", readahead_kb),
                             CBTFS_OPT("cache_dir=%s", cache_dir), CBTFS_OPT("cache_mb=%u", cache_mb),
                             CBTFS_OPT("overlay", overlay),  CBTFS_OPT("overlay=%s", overlay_dir),
                             CBTFS_OPT("overlay_max=%s", overlay_max),
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

// mountinfo escapes blanks and backslashes in paths as \ooo.
std::string unescape_mountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// The file system type of the topmost mount at path ("" when none), from
// /proc/self/mountinfo: looking at the mount point itself would go through
// the FUSE daemon already mounted there, and hang if that one hangs.
std::string mounted_type(const std::string& path) {
  std::ifstream info("/proc/self/mountinfo");
  std::string line, type;
  while (std::getline(info, line)) {
    std::istringstream in(line);
    std::string id, parent, dev, root, mnt;
    in >> id >> parent >> dev >> root >> mnt;
    if (unescape_mountinfo(mnt) != path) continue;
    auto sep = line.find(" - ");
    if (sep == std::string::npos) continue;
    std::istringstream rest(line.substr(sep + 3));
    rest >> type;  // a later line is a mount stacked on top: it wins
  }
  return type;
}

// path made absolute through its parent only, so that the last component
// (maybe a mount point) is not looked at. "" when the parent cannot be resolved.
std::string absolute_keeping_last(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  auto slash = path.rfind('/');
  std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  char buf[PATH_MAX];
  if (base == "." || base == ".." || base.empty()) return realpath(path.c_str(), buf) ? buf : "";
  if (!realpath(parent.c_str(), buf)) return "";
  std::string dir = buf;
  return (dir == "/" ? "" : dir) + "/" + base;
}

// Refuses, before anything is mounted, a mount point that cannot work: a
// cbtfs mount there already (a second one would stack on it silently), a
// path that does not exist, or a file (the kernel would mount the file
// system on it, and every access would fail with EIO).
std::string mount_point_problem(const std::string& mountpoint) {
  if (mountpoint.rfind("/dev/fd/", 0) == 0) return {};  // a /dev/fuse descriptor passed by a parent
  std::string abs = absolute_keeping_last(mountpoint);
  if (!abs.empty() && mounted_type(abs).rfind("fuse.cbtfs", 0) == 0)
    return "a cbtfs file system is already mounted at " + abs + "; unmount it first with fusermount3 -u " + abs;
  struct stat st;
  if (::stat(mountpoint.c_str(), &st) != 0)
    return "mount point " + mountpoint + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode)) return "mount point " + mountpoint + " is not a directory";
  return {};
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

bool fuse_conf_allows_other() {
  std::ifstream conf("/etc/fuse.conf");
  std::string line;
  while (std::getline(conf, line))
    if (line.find("user_allow_other") == 0) return true;
  return false;
}

// libfuse says what failed ("failed to open /dev/fuse: Permission
// denied", fusermount3's refusal) but not what a user can do about it.
void mount_failure_hint(const fuse_args& args) {
  if (::geteuid() == 0) return;  // root mounts directly; libfuse's message is enough
  const passwd* pw = ::getpwuid(::geteuid());
  std::string user = pw ? pw->pw_name : std::to_string(::geteuid());
  struct stat st;
  if (::access("/dev/fuse", R_OK | W_OK) != 0 && (errno == EACCES || errno == EPERM) &&
      ::stat("/dev/fuse", &st) == 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", st.st_mode & 07777);
    std::fprintf(stderr,
                 "cbtfs: hint: user %s may not open /dev/fuse (mode %s, owner uid %u, group gid %u); most systems "
                 "make it 0666 (crw-rw-rw-): ask the administrator to check its permissions (udev rule), or to add "
                 "%s to the group that may open it (often 'fuse')\n",
                 user.c_str(), mode, st.st_uid, st.st_gid, user.c_str());
    return;
  }
  if (has_mount_option(args, "allow_other") && !fuse_conf_allows_other()) {
    std::fprintf(stderr,
                 "cbtfs: hint: -o allow_other for a user other than root needs a line 'user_allow_other' in "
                 "/etc/fuse.conf\n");
    return;
  }
  std::fprintf(stderr,
               "cbtfs: hint: as a user other than root, mounting goes through fusermount3, which must be installed "
               "setuid root (package fuse3), and %s must own the mount point or may write to it\n",
               user.c_str());
}

std::string escape_commas(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ',' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// The checks that need no repository and no mount; an exit code on refusal.
std::optional<int> refuse_options(Options& o, uint64_t& overlay_max) {
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
  if (std::string why = mount_point_problem(o.mountpoint); !why.empty()) {
    std::fprintf(stderr, "cbtfs: %s\n", why.c_str());
    return kExitUsage;
  }
  return std::nullopt;
}

// The repository, or nullptr after saying why not. real: its absolute
// path, or its URL without the query, for fsname.
std::shared_ptr<Repository> open_repository(const Options& o, std::string& real) {
  // The fsname shows in mount(8) and df(1): an absolute path, or the URL
  // without its query (an endpoint is no secret, but it is noise there).
  real = o.repo.substr(0, o.repo.find('?'));
  if (!is_s3_url(o.repo)) {
    char buf[PATH_MAX];
    if (!realpath(o.repo.c_str(), buf)) {
      std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", o.repo.c_str(), std::strerror(errno));
      return nullptr;
    }
    real = buf;
  }
  try {
    if (!is_s3_url(o.repo)) return Repository::open(real);
    // Every read would be a round trip to the gateway without it.
    CacheOptions co;
    if (o.cache_dir) co.dir = o.cache_dir;
    co.size = uint64_t{o.cache_mb} << 20;
    return Repository::open(make_cached_storage(open_storage(o.repo), co));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbtfs: cannot open repository %s: %s\n", real.c_str(), e.what());
    return nullptr;
  }
}

// Mounts, goes to the background unless -f, serves until unmounted.
int mount_and_serve(fuse* f, const fuse_cmdline_opts& cmd, const Options& o, const fuse_args& args,
                    const std::string& real) {
  if (fuse_mount(f, cmd.mountpoint) != 0) {
    std::fprintf(stderr, "cbtfs: cannot mount %s at %s\n", real.c_str(), cmd.mountpoint);
    mount_failure_hint(args);
    return kExitFailed;
  }
  int rc = kExitFailed;
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
      rc = err >= 0 ? kExitOk : kExitFailed;
      fuse_remove_signal_handlers(se);
    }
  }
  fuse_unmount(f);
  return rc;
}

}  // namespace

int main(int argc, char* argv[]) {
  fuse_args args = FUSE_ARGS_INIT(argc, argv);
  struct ArgsGuard {
    fuse_args* a;
    ~ArgsGuard() { fuse_opt_free_args(a); }
  } args_guard{&args};
  Options o;
  if (fuse_opt_parse(&args, &o, kOptions, collect) != 0) return kExitUsage;
  // fuse_opt strdup'ed them; the guards free what the members hold at the end.
  struct StrGuard {
    char*& s;
    ~StrGuard() { free(s); }
  } cache_dir_guard{o.cache_dir}, overlay_dir_guard{o.overlay_dir}, overlay_max_guard{o.overlay_max};
  if (o.overlay_dir || o.overlay_max) o.overlay = 1;
  if (o.help) {
    usage();
    return kExitOk;
  }
  if (o.version) {
    std::printf("cbtfs %s (FUSE %s)\n", CBTFS_VERSION, fuse_pkgversion());
    return kExitOk;
  }
  uint64_t overlay_max = 0;
  if (auto rc = refuse_options(o, overlay_max)) return *rc;
  std::string real;
  std::shared_ptr<Repository> repo = open_repository(o, real);
  if (!repo) return kExitRepo;

  // Read-only (unless writes go to an overlay), and the kernel enforces the
  // mode bits even with allow_other.
  std::string fixed = std::string(o.overlay ? "-o" : "-oro,") + "default_permissions,fsname=" + escape_commas(real) +
                      ",subtype=cbtfs";
  fuse_opt_add_arg(&args, fixed.c_str());

  fuse_cmdline_opts cmd{};
  if (fuse_parse_cmdline(&args, &cmd) != 0) return kExitUsage;
  std::unique_ptr<char, decltype(&free)> mountpoint_guard(cmd.mountpoint, &free);
  if (!cmd.mountpoint) {
    usage();
    return kExitUsage;
  }
  openlog("cbtfs", LOG_PID | (cmd.foreground ? LOG_PERROR : 0), LOG_DAEMON);

  MountState st{MountView(repo), static_cast<mode_t>(o.mode), getuid(), getgid(), time(nullptr), o.readahead_kb, nullptr};
  if (o.overlay) st.overlay = std::make_unique<OverlayStore>(o.overlay_dir ? o.overlay_dir : "", overlay_max);
  fuse* f = fuse_new(&args, &fuse_operations_table(), sizeof(fuse_operations), &st);
  if (!f) return kExitUsage;
  int rc = mount_and_serve(f, cmd, o, args, real);
  fuse_destroy(f);
  return rc;
}
