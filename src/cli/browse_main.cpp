// cbtfs-browse REPO VDI [POINT] DIR: the files of a point, as the guest had
// them at the snapshot. cbtfs-browse -u DIR: undo it.
//
// A point is crash-consistent: its journals are dirty, and a read-only
// mount either refuses it or (noload, norecovery) shows an older state. So
// each browse has a private cbtfs mount with a throw-away overlay, loop
// devices read-write over its image files (the kernel replays the journals
// into the overlay), and the file systems mounted read-only on a tmpfs at
// DIR. Everything is done with the standard tools (cbtfs, mount, losetup,
// blkid, ntfs-3g), run with argv, never through a shell.
//
// Every step is written to a state file in the browse's private directory
// before it is taken, so that -u can undo a browse whose process was killed
// half-way; -u also looks for loop devices by their backing file and for
// mounts in mountinfo, so a step that ran but was not recorded as done is
// undone too. Exit codes: the table of cbtfs/exit_codes.hpp.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/exit_codes.hpp"
#include "cbtfs/open_storage.hpp"
#include "cbtfs/repository.hpp"
#include "mount/browse_plan.hpp"
#include "mount/mount_point.hpp"

using namespace cbtfs;
namespace fs = std::filesystem;

namespace {

// Mount points and the state: small, in RAM, gone at reboot like the mounts.
constexpr const char* kRunBase = "/run/cbtfs-browse";
// The overlay: what journal replay writes. On disk: an XFS log can be large.
constexpr const char* kOverlayBase = "/var/tmp/cbtfs-browse";

const char* prog = "cbtfs-browse";

// ---- running the standard tools --------------------------------------------

struct Result {
  int status = -1;  // exit code; 128 + signal when killed; -1 when it could not run
  std::string out, err;
  bool ok() const { return status == 0; }
  // The tool's own message, on one line.
  std::string message() const {
    std::string m = err.empty() ? out : err;
    while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
    for (auto& c : m)
      if (c == '\n') c = ' ';
    if (m.empty()) m = status < 0 ? "could not be run" : "exit status " + std::to_string(status);
    return m;
  }
};

// Runs argv[0] (searched in PATH) with stdin from /dev/null and stdout,
// stderr captured. A tool that leaves a daemon behind (cbtfs, ntfs-3g)
// returns once the daemon is mounted; the daemon may keep the pipes open,
// so reading stops when the tool itself has exited, not at end of file.
Result run(const std::vector<std::string>& argv) {
  Result r;
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0) return r;
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(out[0]);
    close(out[1]);
    return r;
  }
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    int null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    execvp(args[0], args.data());
    dprintf(2, "%s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    close(out[0]);
    close(err[0]);
    return r;
  }
  auto drain = [](int fd, std::string& into) {
    char buf[4096];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) into.append(buf, static_cast<size_t>(n));
  };
  fcntl(out[0], F_SETFL, O_NONBLOCK);
  fcntl(err[0], F_SETFL, O_NONBLOCK);
  int wstatus = 0;
  for (;;) {
    pollfd p[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    poll(p, 2, 50);
    drain(out[0], r.out);
    drain(err[0], r.err);
    pid_t w = waitpid(pid, &wstatus, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
  }
  drain(out[0], r.out);
  drain(err[0], r.err);
  close(out[0]);
  close(err[0]);
  r.status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
  return r;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

bool in_path(const std::string& tool) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "");
  for (std::string d; std::getline(dirs, d, ':');)
    if (!d.empty() && access((d + "/" + tool).c_str(), X_OK) == 0) return true;
  return false;
}

// The cbtfs next to this program (a build tree, or /usr/bin), else PATH's.
std::string cbtfs_program() {
  std::error_code ec;
  auto self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    auto beside = self.parent_path() / "cbtfs";
    if (access(beside.c_str(), X_OK) == 0) return beside;
  }
  return "cbtfs";
}

// Whether the kernel knows the file system type (after mount(8) has had the
// module loaded, if there is one).
bool kernel_has(const std::string& type) {
  std::istringstream in(read_file("/proc/filesystems"));
  for (std::string line; std::getline(in, line);)
    if (line.substr(line.find('\t') + 1) == type) return true;
  return false;
}

bool is_mounted(const std::string& path) {
  for (auto& m : mount::mounts_at_or_under(path))
    if (m == path) return true;
  return false;
}

// ---- the state file ---------------------------------------------------------

class StateFile {
 public:
  explicit StateFile(int fd) : fd_(fd) {}
  ~StateFile() {
    if (fd_ >= 0) close(fd_);
  }
  StateFile(const StateFile&) = delete;
  StateFile& operator=(const StateFile&) = delete;
  int fd() const { return fd_; }

  // Written and synced before the step it names is taken.
  void add(const std::string& key, const std::string& value) {
    std::string line = browse::state_line(key, value);
    if (write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size()) || fdatasync(fd_) != 0)
      throw StorageError("cannot write the state file: " + std::string(std::strerror(errno)), errno);
  }

  // After a step: the test hook CBTFS_BROWSE_TEST_PAUSE_AFTER=N stops here
  // for good after the N-th step, so that a test can kill the process at a
  // known point of the set-up.
  void step_done() {
    ++steps_;
    const char* pause_after = std::getenv("CBTFS_BROWSE_TEST_PAUSE_AFTER");
    if (pause_after && std::atoi(pause_after) == steps_) {
      std::fprintf(stderr, "%s: test hook: paused after step %d\n", prog, steps_);
      std::fflush(stderr);
      for (;;) pause();
    }
  }

 private:
  int fd_;
  int steps_ = 0;
};

// ---- undo -------------------------------------------------------------------

bool unmount(const std::string& path, std::string& why) {
  for (int attempt = 0; attempt < 20; ++attempt) {
    if (!is_mounted(path)) return true;
    Result r = run({"umount", path});
    if (r.ok() || !is_mounted(path)) return true;
    why = r.message();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // a loop device or daemon letting go
  }
  return !is_mounted(path);
}

// Loop devices whose backing file is below prefix, from sysfs: found even
// when the process that attached them died before writing their name down.
std::vector<std::string> loops_below(const std::string& prefix) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto& e : fs::directory_iterator("/sys/block", ec)) {
    std::string name = e.path().filename();
    if (!name.starts_with("loop")) continue;
    std::string back = read_file(e.path() / "loop" / "backing_file");
    while (!back.empty() && back.back() == '\n') back.pop_back();
    if (back.starts_with(prefix)) out.push_back("/dev/" + name);
  }
  return out;
}

// Every tool a browse runs carries kOwnerVar=<its private directory> in its
// environment. A browse killed half-way leaves its running tools behind (a
// mount that lands a moment later, a losetup): -u waits for them first.
// The daemons (cbtfs, ntfs-3g) carry it too but stay: they are session
// leaders once in the background, and those are not waited for.
constexpr const char* kOwnerVar = "CBTFS_BROWSE_OF";

void wait_for_stragglers(const std::string& priv) {
  const std::string marker = std::string(kOwnerVar) + "=" + priv;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (;;) {
    std::vector<std::string> left;
    std::error_code ec;
    for (auto& e : fs::directory_iterator("/proc", ec)) {
      std::string pid = e.path().filename();
      if (pid.find_first_not_of("0123456789") != std::string::npos || pid == std::to_string(getpid())) continue;
      std::string env = read_file(e.path() / "environ");
      bool ours = false;
      for (size_t i = 0; i < env.size();) {
        size_t end = env.find('\0', i);
        if (end == std::string::npos) end = env.size();
        if (env.compare(i, end - i, marker) == 0) ours = true;
        i = end + 1;
      }
      if (!ours) continue;
      // Field 6 of stat is the session; ")" ends the command name.
      std::string stat = read_file(e.path() / "stat");
      auto paren = stat.rfind(')');
      if (paren == std::string::npos) continue;
      std::istringstream in(stat.substr(paren + 1));
      std::string state, ppid, pgrp, session;
      in >> state >> ppid >> pgrp >> session;
      if (session != pid && state != "Z") left.push_back(pid);
    }
    if (left.empty()) return;
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "%s: processes of an interrupted browse still run (pid %s); going on\n", prog,
                   left[0].c_str());
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Undoes the browse of dir (canonical). held: the state file's descriptor
// when the caller (a failed browse) holds its lock already.
int undo(const std::string& dir, int held = -1) {
  const std::string priv = browse::private_dir(kRunBase, dir);
  const std::string overlay = browse::private_dir(kOverlayBase, dir);
  const std::string state_path = priv + "/state";
  std::error_code ec;
  if (!fs::exists(priv, ec) && !fs::exists(overlay, ec)) {
    if (held < 0) std::printf("%s: %s is not browsed: nothing to undo\n", prog, dir.c_str());
    return kExitOk;
  }
  int fd = held;
  browse::State state;
  if (fs::exists(state_path, ec)) {
    if (fd < 0) {
      fd = open(state_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) != 0) {
        state = browse::parse_state(read_file(state_path));
        std::fprintf(stderr,
                     "%s: a cbtfs-browse (pid %s) is still setting up %s; wait for it to finish, or stop it, "
                     "then run %s -u again\n",
                     prog, browse::state_value(state, "pid").c_str(), dir.c_str(), prog);
        close(fd);
        return kExitLocked;
      }
    }
    state = browse::parse_state(read_file(state_path));
  }
  if (held < 0) wait_for_stragglers(priv);
  bool ok = true;
  auto fail = [&](const std::string& what) {
    std::fprintf(stderr, "%s: %s\n", prog, what.c_str());
    ok = false;
  };
  std::string why;
  // 1. What the user sees: everything on the tmpfs at DIR, then the tmpfs.
  bool had_tmpfs = false;
  for (auto& [k, v] : state) had_tmpfs |= k == "tmpfs" && v == dir;
  if (had_tmpfs) {
    auto mounts = mount::mounts_at_or_under(dir);
    for (auto it = mounts.rbegin(); it != mounts.rend(); ++it)
      if (!unmount(*it, why))
        fail("cannot unmount " + *it + ": " + why +
             " (a shell or program may be using it; close it and run cbtfs-browse -u again)");
  }
  if (!ok) return kExitIo;  // the file systems hold the loop devices, the loop devices the mount
  // 2. The private mounts (NTFS through ntfs-3g) other than cbtfs's own.
  const std::string repo_mnt = priv + "/repo";
  auto mounts = mount::mounts_at_or_under(priv);
  for (auto it = mounts.rbegin(); it != mounts.rend(); ++it)
    if (*it != repo_mnt && !unmount(*it, why)) fail("cannot unmount " + *it + ": " + why);
  // 3. The loop devices over the private mount's files.
  for (auto& dev : loops_below(repo_mnt + "/")) {
    Result r = run({"losetup", "-d", dev});
    if (!r.ok()) fail("cannot detach " + dev + ": " + r.message());
  }
  for (int i = 0; i < 50 && !loops_below(repo_mnt + "/").empty(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (!loops_below(repo_mnt + "/").empty()) fail("loop devices over " + repo_mnt + " are still attached");
  // 4. The private cbtfs mount; its overlay (unnamed files) goes with it.
  if (ok && !unmount(repo_mnt, why)) fail("cannot unmount " + repo_mnt + ": " + why);
  if (!ok) return kExitIo;
  // 5. The directories, the state last.
  for (auto& e : fs::directory_iterator(priv, ec))
    if (e.is_directory(ec)) fs::remove(e.path(), ec);
  fs::remove(overlay, ec);
  if (fs::exists(overlay, ec)) fail("cannot remove " + overlay + ": it is not empty");
  fs::remove(state_path, ec);
  fs::remove(priv, ec);
  if (fd >= 0 && fd != held) close(fd);
  if (!ok) return kExitIo;
  if (held < 0) std::printf("%s: %s undone\n", prog, dir.c_str());
  return kExitOk;
}

// ---- browse -----------------------------------------------------------------

struct Outcome {
  std::string name, type, what;  // what: the mount point, or why not
  bool mounted = false, failed = false;
};

int report_repo_error() {
  try {
    throw;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitUsage;
  } catch (const KeyError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitKey;
  } catch (const FormatError& e) {
    std::fprintf(stderr, "%s: cannot open the repository: %s\n", prog, e.what());
    return kExitRepo;
  } catch (const StorageError& e) {
    std::fprintf(stderr, "%s: cannot open the repository: %s\n", prog, e.what());
    return e.error_number() == ENOENT || e.error_number() == EACCES || e.error_number() == ENOTDIR ? kExitRepo
                                                                                                    : kExitIo;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitIo;
  }
}

int browse_point(const std::string& repo_arg, const std::string& vdi_arg, const std::string& point_arg,
                 const std::string& dir) {
  // The plan first, from the repository itself: a wrong name is said
  // before anything is mounted.
  browse::Plan plan;
  std::string repo_loc;
  try {
    repo_loc = absolute_location(repo_arg);
    auto repo = Repository::open(open_storage(repo_loc));
    MountView view(repo);
    plan = browse::plan_browse(view, vdi_arg, point_arg);
  } catch (...) {
    return report_repo_error();
  }
  if (plan.targets.empty()) {
    std::fprintf(stderr, "%s: point %s of VDI %s has no image\n", prog, plan.point.c_str(), plan.vdi.c_str());
    return kExitUsage;
  }

  const std::string priv = browse::private_dir(kRunBase, dir);
  const std::string overlay = browse::private_dir(kOverlayBase, dir);
  mkdir(kRunBase, 0700);
  mkdir(kOverlayBase, 0700);
  if (mkdir(priv.c_str(), 0700) != 0) {
    if (errno == EEXIST) {
      std::fprintf(stderr,
                   "%s: %s is browsed already, or a browse of it was interrupted: run %s -u %s first\n", prog,
                   dir.c_str(), prog, dir.c_str());
      return kExitUsage;
    }
    std::fprintf(stderr, "%s: cannot create %s: %s\n", prog, priv.c_str(), std::strerror(errno));
    return kExitIo;
  }
  int fd = open((priv + "/state").c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0 || flock(fd, LOCK_EX) != 0) {
    std::fprintf(stderr, "%s: cannot create the state file in %s: %s\n", prog, priv.c_str(), std::strerror(errno));
    if (fd >= 0) close(fd);
    rmdir(priv.c_str());
    return kExitIo;
  }
  StateFile state(fd);
  setenv(kOwnerVar, priv.c_str(), 1);  // for every tool run from here on
  // A fatal step undoes what was done and exits.
  auto abort_browse = [&](const std::string& why, int code) {
    std::fprintf(stderr, "%s: %s\n", prog, why.c_str());
    undo(dir, state.fd());
    return code;
  };
  const std::string repo_mnt = priv + "/repo";
  const std::string vdi_dir = repo_mnt + "/" + plan.vdi;
  std::vector<Outcome> outcomes;
  try {
    state.add("pid", std::to_string(getpid()));
    state.add("dir", dir);
    state.add("repo", repo_loc);
    state.add("point", plan.vdi + " " + plan.point);
    state.add("overlay", overlay);

    // The private mount of the repository, writable into its own overlay.
    state.add("cbtfs", repo_mnt);
    if (mkdir(overlay.c_str(), 0700) != 0 && errno != EEXIST)
      return abort_browse("cannot create " + overlay + ": " + std::strerror(errno), kExitIo);
    mkdir(repo_mnt.c_str(), 0700);
    Result r = run({cbtfs_program(), "-o", "overlay=" + overlay, repo_loc, repo_mnt});
    if (!r.ok()) return abort_browse("cannot mount the repository: " + r.message(), kExitFailed);
    state.step_done();

    // What each file holds.
    struct Probe {
      browse::Target t;
      browse::FsAction act;
    };
    std::vector<Probe> probes;
    for (auto& t : plan.targets) {
      Result b = run({"blkid", "-p", "-o", "export", vdi_dir + "/" + t.file});
      auto tags = browse::parse_blkid_export(b.out);
      browse::FsAction act = browse::classify(b.ok() ? tags["TYPE"] : "");
      if (b.status == 8) act.why = "several file system signatures (ambivalent): not mounted";
      else if (!b.ok() && b.status != 2) act.why = "blkid failed: " + b.message();
      if (act.kind == browse::FsAction::Kind::Ntfs3g && !in_path("ntfs-3g")) {
        act.kind = browse::FsAction::Kind::Skip;
        act.why = "NTFS needs ntfs-3g, which is not installed (apt-get install ntfs-3g)";
      }
      probes.push_back({t, act});
    }

    // What the user sees: a tmpfs, read-only once the mount points are in it.
    state.add("tmpfs", dir);
    r = run({"mount", "-t", "tmpfs", "-o", "mode=0755,size=1m,nosuid,nodev,noexec", "cbtfs-browse", dir});
    if (!r.ok()) return abort_browse("cannot mount a tmpfs at " + dir + ": " + r.message(), kExitIo);
    state.step_done();

    for (auto& [t, act] : probes) {
      Outcome o{t.name, act.type.empty() ? "-" : act.type, "", false, false};
      if (act.kind == browse::FsAction::Kind::Skip) {
        o.what = "not mounted: " + act.why;
        outcomes.push_back(o);
        continue;
      }
      const std::string file = vdi_dir + "/" + t.file, where = dir + "/" + t.name;
      mkdir(where.c_str(), 0755);
      state.add("loop", file);
      Result l = run({"losetup", "--find", "--show", file});
      std::string dev = l.out.substr(0, l.out.find('\n'));
      if (!l.ok() || dev.empty()) {
        o.what = "not mounted: no loop device: " + l.message();
        o.failed = true;
        outcomes.push_back(o);
        rmdir(where.c_str());
        continue;
      }
      state.add("loopdev", dev);
      state.step_done();
      // A read-only flag set on the device by an earlier user (blockdev
      // --setro) outlives it and would stop the journal replay.
      if (read_file("/sys/block/" + dev.substr(dev.rfind('/') + 1) + "/ro").starts_with("1"))
        run({"blockdev", "--setrw", dev});
      Result m;
      if (act.kind == browse::FsAction::Kind::Mount) {
        state.add("mount", where);
        m = run({"mount", "-t", act.type, "-o", act.options, dev, where});
      } else {
        // ntfs-3g read-write into the overlay (it removes a hibernation
        // file and resets the log there, never in the repository), shown
        // read-only through a bind mount.
        const std::string stage = priv + "/ntfs-" + t.name;
        mkdir(stage.c_str(), 0700);
        state.add("mount", stage);
        m = run({"ntfs-3g", "-o", "remove_hiberfile", dev, stage});
        if (m.ok()) {
          state.step_done();
          state.add("mount", where);
          m = run({"mount", "--bind", "-o", "ro,nosuid,nodev", stage, where});
        }
      }
      if (m.ok()) {
        state.step_done();
        o.mounted = true;
        o.what = where;
      } else if (act.kind == browse::FsAction::Kind::Mount && !kernel_has(act.type)) {
        o.what = "not mounted: this kernel has no " + act.type + " driver";
      } else {
        o.failed = true;
        o.what = "not mounted: " + m.message();
      }
      if (!o.mounted) {
        std::string why;
        for (auto& p : mount::mounts_at_or_under(priv + "/ntfs-" + t.name)) unmount(p, why);
        run({"losetup", "-d", dev});
        rmdir(where.c_str());
      }
      outcomes.push_back(o);
    }

    bool any = false, failed = false;
    for (auto& o : outcomes) {
      any |= o.mounted;
      failed |= o.failed;
    }
    if (any) {
      state.add("remount-ro", dir);
      r = run({"mount", "-o", "remount,ro", dir});
      if (!r.ok()) return abort_browse("cannot make " + dir + " read-only: " + r.message(), kExitIo);
      state.step_done();
    }

    std::string label = plan.label.empty() ? plan.vdi : plan.label + " (" + plan.vdi + ")";
    std::printf("%s: %s at %s\n", prog, label.c_str(), plan.point.c_str());
    size_t w = 4, tw = 4;
    for (auto& o : outcomes) {
      w = std::max(w, o.name.size());
      tw = std::max(tw, o.type.size());
    }
    for (auto& o : outcomes)
      std::printf("  %-*s  %-*s  %s\n", static_cast<int>(w), o.name.c_str(), static_cast<int>(tw), o.type.c_str(),
                  o.what.c_str());
    if (!any) {
      std::fflush(stdout);
      return abort_browse("nothing to browse: no file system of this point could be mounted", kExitFailed);
    }
    std::printf("Read-only, as the guest had it at the snapshot. When done: %s -u %s\n", prog, dir.c_str());
    return failed ? kExitFailed : kExitOk;
  } catch (const std::exception& e) {
    return abort_browse(e.what(), kExitIo);
  }
}

void usage(FILE* to) {
  std::fprintf(to,
               "usage: cbtfs-browse REPO VDI [POINT] DIR\n"
               "       cbtfs-browse -u DIR\n"
               "Mounts every file system of a point read-only under DIR (part1, part2, ...,\n"
               "lv-VG-LV, disk), with journals replayed into a throw-away overlay: the files\n"
               "as the guest had them at the snapshot. VDI: a uuid, or VM/VDI as under by-name/.\n"
               "POINT: 2026-11-24T030000Z or latest (the default). Needs root.\n"
               "  -u DIR   unmount and undo everything a browse of DIR set up (also after\n"
               "           an interrupted browse); safe to repeat\n"
               "  -h, --help     this text\n"
               "  -V, --version  the version\n"
               "See cbtfs-browse(1).\n");
}

// DIR as an absolute path without symbolic links: the private directory is
// named after it. A browsed DIR is a mount point; nothing below is touched.
std::optional<std::string> canonical_dir(const std::string& arg) {
  char buf[PATH_MAX];
  if (!realpath(arg.c_str(), buf)) {
    std::fprintf(stderr, "%s: %s: %s\n", prog, arg.c_str(), std::strerror(errno));
    return std::nullopt;
  }
  struct stat st;
  if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
    std::fprintf(stderr, "%s: %s is not a directory\n", prog, arg.c_str());
    return std::nullopt;
  }
  std::string d = buf;
  if (d == "/" || d.find('\n') != std::string::npos) {
    std::fprintf(stderr, "%s: %s cannot be browsed into\n", prog, arg.c_str());
    return std::nullopt;
  }
  return d;
}

}  // namespace

int main(int argc, char* argv[]) {
  std::vector<std::string> args(argv + 1, argv + argc);
  bool undo_mode = false;
  std::vector<std::string> pos;
  for (auto& a : args) {
    if (a == "-h" || a == "--help") {
      usage(stdout);
      return kExitOk;
    }
    if (a == "-V" || a == "--version") {
      std::printf("cbtfs-browse %s\n", CBTFS_VERSION);
      return kExitOk;
    }
    if (a == "-u" || a == "--undo") undo_mode = true;
    else if (a.size() > 1 && a[0] == '-') {
      std::fprintf(stderr, "%s: unknown option %s\n", prog, a.c_str());
      usage(stderr);
      return kExitUsage;
    } else pos.push_back(a);
  }
  if (undo_mode ? pos.size() != 1 : (pos.size() < 3 || pos.size() > 4)) {
    usage(stderr);
    return kExitUsage;
  }
  if (geteuid() != 0) {
    std::fprintf(stderr,
                 "%s: must be run as root: it attaches loop devices and mounts file systems "
                 "(try: sudo %s ...)\n",
                 prog, prog);
    return kExitUsage;
  }
  // The tools live in sbin, which a sudo or cron PATH may lack.
  std::string path = std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin:/bin";
  setenv("PATH", (path + ":/usr/sbin:/sbin:/usr/bin:/bin").c_str(), 1);
  signal(SIGPIPE, SIG_IGN);

  auto dir = canonical_dir(pos.back());
  if (!dir) return kExitUsage;
  if (undo_mode) return undo(*dir);
  return browse_point(pos[0], pos[1], pos.size() == 4 ? pos[2] : "latest", *dir);
}
