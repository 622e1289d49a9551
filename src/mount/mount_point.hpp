// The mount point and the system around it, before and after the kernel
// mounts: what mountinfo says is mounted where, what a user can do when a
// mount is refused. Nothing here goes through the mounted file system, so
// nothing hangs when a FUSE daemon there does.
#pragma once

#include <string>
#include <vector>

namespace cbtfs::mount {

// Why mountpoint cannot take a cbtfs mount ("" when it can): a cbtfs mount
// there already (a second one would stack on it silently), a path that does
// not exist, or a file (every access would fail with EIO).
std::string mount_point_problem(const std::string& mountpoint);

// The kernel caps a FUSE mount's readahead at 128 KiB; sequential copies run
// at twice the speed or more with a larger window. Best effort: needs root.
void raise_readahead(const std::string& mountpoint, unsigned kb);

// What a user other than root can do about a refused mount (libfuse says
// what failed, not that): /dev/fuse permissions, user_allow_other,
// fusermount3. "" for root.
std::string mount_failure_hint(bool allow_other);

// The file system type of the topmost mount at the absolute path ("" when
// none), from /proc/self/mountinfo.
std::string mounted_type(const std::string& path);

// The mount points at the absolute path or below it, in the order
// /proc/self/mountinfo lists them (a mount comes after the one it sits on,
// so unmount in reverse).
std::vector<std::string> mounts_at_or_under(const std::string& path);

}  // namespace cbtfs::mount
