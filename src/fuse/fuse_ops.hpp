// The FUSE operations table of cbtfs. It only translates: paths go to a
// MountView, reads, writes and seeks to an ImageFile (mount/image_file.hpp),
// exceptions to errno.
#pragma once

#include <fuse3/fuse.h>
#include <sys/types.h>

#include <memory>

#include "mount/mount_view.hpp"
#include "mount/overlay.hpp"

namespace cbtfs {

struct MountState {
  MountView view;
  mode_t image_mode = 0400;
  uid_t uid = 0;
  gid_t gid = 0;
  time_t mount_time = 0;
  unsigned readahead_kb = 4096;
  std::unique_ptr<OverlayStore> overlay;  // -o overlay: images writable, writes thrown away
};

const fuse_operations& fuse_operations_table();

// The callbacks find the state through fuse_get_context()->private_data,
// which libfuse sets only on its own threads. While one of these lives, the
// callbacks called on this thread use `state` instead: tests call them
// without a kernel mount.
class CallbackScope {
 public:
  explicit CallbackScope(MountState& state);
  ~CallbackScope();
  CallbackScope(const CallbackScope&) = delete;
  CallbackScope& operator=(const CallbackScope&) = delete;
};

}  // namespace cbtfs
