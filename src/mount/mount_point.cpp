#include "mount_point.hpp"

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace cbtfs::mount {

namespace {

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

bool fuse_conf_allows_other() {
  std::ifstream conf("/etc/fuse.conf");
  std::string line;
  while (std::getline(conf, line))
    if (line.find("user_allow_other") == 0) return true;
  return false;
}

}  // namespace

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

std::vector<std::string> mounts_at_or_under(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream info("/proc/self/mountinfo");
  std::string line;
  const std::string below = path == "/" ? "/" : path + "/";
  while (std::getline(info, line)) {
    std::istringstream in(line);
    std::string id, parent, dev, root, mnt;
    in >> id >> parent >> dev >> root >> mnt;
    mnt = unescape_mountinfo(mnt);
    if (mnt == path || mnt.starts_with(below)) out.push_back(mnt);
  }
  return out;
}

std::string mount_point_problem(const std::string& mountpoint) {
  if (mountpoint.rfind("/dev/fd/", 0) == 0) return {};  // a /dev/fuse descriptor passed by a parent
  std::string abs = absolute_keeping_last(mountpoint);
  if (!abs.empty() && mounted_type(abs).rfind("fuse.cbtfs", 0) == 0)
    return "a cbtfs file system is already mounted at " + abs + "; unmount it first with fusermount3 -u " + abs;
  struct stat st;
  if (::stat(mountpoint.c_str(), &st) != 0) return "mount point " + mountpoint + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode)) return "mount point " + mountpoint + " is not a directory";
  return {};
}

// The device number comes from mountinfo: a stat() of the mount point would
// wait for this very daemon.
void raise_readahead(const std::string& mountpoint, unsigned kb) {
  char real[PATH_MAX];
  if (!realpath(mountpoint.c_str(), real)) return;
  std::ifstream info("/proc/self/mountinfo");
  std::string line;
  while (std::getline(info, line)) {
    std::istringstream in(line);
    std::string id, parent, dev, root, mnt;
    in >> id >> parent >> dev >> root >> mnt;
    if (mnt != real) continue;
    std::ofstream ra("/sys/class/bdi/" + dev + "/read_ahead_kb");
    ra << kb;  // harmless when refused
  }
}

std::string mount_failure_hint(bool allow_other) {
  if (::geteuid() == 0) return {};  // root mounts directly; libfuse's message is enough
  const passwd* pw = ::getpwuid(::geteuid());
  std::string user = pw ? pw->pw_name : std::to_string(::geteuid());
  struct stat st;
  if (::access("/dev/fuse", R_OK | W_OK) != 0 && (errno == EACCES || errno == EPERM) &&
      ::stat("/dev/fuse", &st) == 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", st.st_mode & 07777);
    return "user " + user + " may not open /dev/fuse (mode " + mode + ", owner uid " + std::to_string(st.st_uid) +
           ", group gid " + std::to_string(st.st_gid) +
           "); most systems make it 0666 (crw-rw-rw-): ask the administrator to check its permissions (udev rule), "
           "or to add " + user + " to the group that may open it (often 'fuse')";
  }
  if (allow_other && !fuse_conf_allows_other())
    return "-o allow_other for a user other than root needs a line 'user_allow_other' in /etc/fuse.conf";
  return "as a user other than root, mounting goes through fusermount3, which must be installed setuid root "
         "(package fuse3), and " + user + " must own the mount point or may write to it";
}

}  // namespace cbtfs::mount
