// One backup run: snapshot the selected disks, pull what changed since each
// disk's previous point over NBD, commit a point per disk, and leave only
// metadata-only snapshots behind on the host. Each VM (or VDI given alone)
// is a job of its own, from snapshot to cleanup; --jobs workers run them,
// each on a XAPI connection of its own (backup_job.hpp).
//
// Invariant: every snapshot this run takes either becomes a committed point
// and is then turned into a metadata-only snapshot, or is destroyed. No
// snapshot with data stays on the host, whatever fails.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cbtfs/repository.hpp"
#include "nbd/nbd_reader.hpp"
#include "xapi/client.hpp"
#include "selection.hpp"
#include "xapi_ops.hpp"

namespace cbtfs::ingest {

struct Options {
  std::vector<std::string> vms;   // uuid or name label
  std::vector<std::string> vdis;  // uuid
  VmFilter pool;                  // VMs chosen by --all / --tag, less the excluded ones
  int jobs = 2;                   // VDIs in parallel
  int connections = 4;            // NBD connections per VDI
  int host_connections = 8;       // NBD connections per host, across all VDIs (xapi-nbd serves 16)
  std::chrono::seconds busy_timeout{900};  // a busy NBD server is waited for this long
  nbd::Options nbd;
  long snapshot_timeout = 600;    // seconds a VDI snapshot may take on the host
};

struct Outcome {
  std::string vdi_uuid, vdi_name, vm_name, vm_uuid;
  bool ok = false;
  std::string error;
  // Why a disk (or, vdi_uuid empty, a whole VM) that --all or --tag found
  // is not backed up: it cannot have changed block tracking, or has no
  // disks. Not a failure: such an Outcome is no selected VDI.
  std::string skipped;
  bool full = false;
  std::string chain_reason;
  std::string point;  // image name of the new point
  std::string snapshot_uuid;
  uint64_t virtual_size = 0;
  uint64_t blocks_changed = 0;  // blocks read over NBD
  uint64_t bytes_read = 0;
  uint64_t bytes_stored = 0;
  double seconds = 0;
  std::string nbd_host;  // the host it was read from (its certificate's name, else its address)
  // The VDI's newest point in the repository after the run: this run's on
  // success, else an earlier one; 0 when it has none. Seconds since the epoch.
  int64_t last_point_time = 0;
  // What the run found that an admin should look at (a disk held by a
  // control domain, ...); the point may be fine.
  std::vector<std::string> warnings;
};

using Log = std::function<void(const std::string&)>;

// How far the copying has come, for the command to draw: the ingest knows
// no terminal. start() when the copying begins; update() with the bytes
// copied of the bytes to copy so far (the total grows as each disk learns
// what changed), from the copying threads but one call at a time; finish()
// once they have all ended.
class ProgressReport {
 public:
  virtual ~ProgressReport() = default;
  virtual void start() = 0;
  virtual void update(uint64_t done, uint64_t total) = 0;
  virtual void finish() = 0;
};

// Never throws for a single VDI's failure: each Outcome says what happened.
// progress may be null: no progress is reported.
std::vector<Outcome> run(xapi::Client& client, std::shared_ptr<Repository> repo, const Options& opts, const Log& log,
                         ProgressReport* progress);

// The run's snapshot of one VDI, for cbtfs-repo rollback. The caller holds
// the VDI's lock in the repository (Repository::lock_vdi): the journal lives
// beside the VDI's points.
//
// recover_interrupted_snapshot settles the journal an interrupted run left
// (ingest or rollback): the snapshot its task took is removed, unless it is
// the repository's newest point's.
void recover_interrupted_snapshot(xapi::Client& client, std::shared_ptr<Repository> repo, const VdiInfo& vdi,
                                  const Options& opts, const Log& log);
// Async.VDI.snapshot, journaled until the snapshot is named `name`, exactly
// as a run of one VDI takes it. A name that does not start with the
// ingest's prefix keeps the ingest's cleanup away from it. Throws when the
// snapshot fails; what it leaves is then the journal's.
VdiInfo take_named_snapshot(xapi::Client& client, std::shared_ptr<Repository> repo, const VdiInfo& vdi,
                            const std::string& name, const Options& opts, const Log& log);

}  // namespace cbtfs::ingest
