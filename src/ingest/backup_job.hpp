// One job of a run: the disks of one VM (one VM.snapshot, a crash-consistent
// set) or one VDI, from lock to cleanup: lock each disk in the repository,
// clean up what interrupted runs left, snapshot, copy what changed, commit,
// and leave only metadata-only snapshots behind. A run gives its jobs to
// --jobs workers, each with a XAPI connection of its own, so that one job's
// XAPI calls overlap another's copying, and a job's snapshots live only as
// long as the job.
//
// Invariant: every snapshot a job takes either becomes a committed point
// and is then turned into a metadata-only snapshot, or is destroyed. No
// snapshot with data stays on the host, whatever fails.
//
// The methods live in files named after what they do: backup_job.cpp (the
// order of the steps, loading and locking the disks), job_snapshot.cpp
// (taking and journaling snapshots), job_transfer.cpp (what changed, and
// copying it), job_cleanup.cpp (leftovers, and settling the snapshots).
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "cbtfs/point_writer.hpp"
#include "ingest.hpp"
#include "run_context.hpp"
#include "transfer.hpp"
#include "xapi_ops.hpp"

namespace cbtfs::ingest {

// One disk of a job.
struct Task {
  VdiInfo vdi;
  std::string vm_name, vm_uuid;
  std::optional<VdiInfo> snap;
  std::unique_ptr<PointWriter> writer;
  bool cbt_was_off = false;
  bool journal = false;       // the repository holds a journal for this disk
  std::string snapshot_task;  // the Async.VDI.snapshot task, until the snapshot is named
  bool committed = false;
  // The disk's snapshots on the host (the new one aside), read once when
  // first needed; kept up to date with what the job does to them. Under
  // the disk's lock no other run of this repository touches them.
  std::optional<std::vector<VdiInfo>> host_snapshots;
  Outcome out;
};

// The disks a job backs up, as selection found them.
struct JobSpec {
  std::optional<VmInfo> vm;  // a VM whose disks the job loads; else one VDI
  std::string vm_key;        // else the uuid or name of a VM the job looks up first
  bool from_pool = false;    // chosen by --all / --tag: disks without CBT are skipped, not failed
  std::optional<VdiInfo> vdi;
  std::string vm_name, vm_uuid;  // of the VDI
  std::string what;              // what a failure to load the VM names: "VM web01"
};

// The disks of the run that a job has claimed: a disk of two VMs is backed
// up once, with the first job that loads it.
class Claims {
 public:
  bool claim(const std::string& vdi_uuid) {
    std::lock_guard g(mu_);
    return seen_.insert(vdi_uuid).second;
  }
  // A VM named twice (by name and by uuid) is backed up by the first job.
  bool claim_vm(const std::string& vm_uuid) {
    std::lock_guard g(mu_);
    return vms_.insert(vm_uuid).second;
  }

 private:
  std::mutex mu_;
  std::set<std::string> seen_, vms_;
};

class BackupJob {
 public:
  BackupJob(RunContext& ctx, xapi::Client& c) : ctx_(ctx), c_(c) {}

  // Never throws: every disk's Outcome says what happened. errors are
  // failures not tied to one disk (the VM could not be read).
  void run(const JobSpec& spec, Claims& claims);
  std::vector<Outcome> outcomes, skipped, errors;

  // For cbtfs-repo rollback (see ingest.hpp): one VDI, no point written.
  void recover_only(const VdiInfo& vdi);
  VdiInfo snapshot_only(const VdiInfo& vdi, const std::string& name);

 private:
  // backup_job.cpp
  bool load(const JobSpec& spec, Claims& claims);
  void add_task(const VdiInfo& vdi, const std::string& vm_name, const std::string& vm_uuid,
                std::optional<std::vector<VdiInfo>> snapshots = std::nullopt);
  void skip(const VmInfo& vm, const VdiInfo* disk, const std::string& why);
  void prepare();
  void say(const Task& t, const std::string& msg);
  void fail(Task& t, const std::string& why);

  // job_snapshot.cpp
  void snapshot();
  void snapshot_one(Task& t);
  VdiInfo await_snapshot(Task& t, const std::string& task);
  void name_snapshot(Task& t, const std::string& name);
  void recover_journal(Task& t);

  // job_transfer.cpp
  void transfer_all();
  void transfer_one(Task& t);
  std::string chain_break(Task& t, std::vector<bool>& bits);
  Source source_for(Task& t, const std::vector<nbd::Target>& targets);

  // job_cleanup.cpp
  void remove_leftover_snapshot_vms();
  void remove_leftover_snapshots(Task& t, bool keep_metadata);
  bool held_by_dom0(Task& t, const VdiInfo& s);
  void finish();
  void settle_snapshot(Task& t);
  std::vector<VdiInfo> fetch_snapshots(const Task& t);
  std::vector<VdiInfo>& known_snapshots(Task& t);
  std::string needed_snapshot(const Task& t);
  bool ours(const VdiInfo& s) const { return s.name.rfind(ctx_.prefix, 0) == 0; }

  RunContext& ctx_;
  xapi::Client& c_;
  std::optional<VmInfo> vm_;
  std::string snapshot_vm_ref_;
  std::vector<Task> tasks_;
};

}  // namespace cbtfs::ingest
