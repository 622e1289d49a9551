// A job's steps in order, and what comes before the snapshot: loading the
// disks, locking them in the repository, making sure CBT is on.
#include "backup_job.hpp"

#include <ctime>

#include "cbtfs/errors.hpp"

namespace cbtfs::ingest {

void BackupJob::run(const JobSpec& spec, Claims& claims) {
  if (load(spec, claims)) {
    prepare();
    snapshot();
    transfer_all();
    finish();
  }
  for (auto& t : tasks_) {
    if (!t.out.ok) {
      try {
        if (auto latest = ctx_.repo->latest(t.vdi.uuid)) t.out.last_point_time = latest->time;
      } catch (const std::exception&) {
        // the repository cannot say: the metrics leave the time out
      }
    }
    outcomes.push_back(std::move(t.out));
  }
}

// The VM's disks, read now rather than at selection: a job of the pool's
// run reads them while others copy.
bool BackupJob::load(const JobSpec& spec, Claims& claims) {
  if (!spec.vm && spec.vm_key.empty()) {
    if (claims.claim(spec.vdi->uuid)) add_task(*spec.vdi, spec.vm_name, spec.vm_uuid);
    return !tasks_.empty();
  }
  try {
    if (spec.vm) {
      vm_ = spec.vm;
    } else {
      vm_ = find_vm(c_, spec.vm_key);
      if (!claims.claim_vm(vm_->uuid)) return false;
    }
    // The disks and their snapshots on the host: two calls, whatever the
    // number of disks.
    std::map<std::string, std::vector<VdiInfo>> snapshots;
    load_disks(c_, *vm_, &snapshots);
    if (vm_->disks.empty()) {
      if (!spec.from_pool) throw std::runtime_error("VM '" + vm_->name + "' has no disks");
      skip(*vm_, nullptr, "it has no disks");
      return false;
    }
    for (auto& d : vm_->disks) {
      // A disk that cannot have changed block tracking is reported, not
      // failed, when --all or --tag found it: nobody asked for it by name,
      // and the next run would fail it again.
      std::string why = spec.from_pool ? enable_cbt_if_possible(c_, d) : "";
      if (!why.empty())
        skip(*vm_, &d, "it cannot have changed block tracking: " + why);
      else if (claims.claim(d.uuid))
        add_task(d, vm_->name, vm_->uuid, std::move(snapshots[d.ref]));
    }
    if (tasks_.empty() && spec.from_pool && skipped.size() == vm_->disks.size())
      skip(*vm_, nullptr, "none of its disks can have changed block tracking");
  } catch (const std::exception& e) {
    Outcome o;
    o.vdi_uuid = spec.what;
    o.error = e.what();
    ctx_.log(o.vdi_uuid + ": FAILED: " + o.error);
    errors.push_back(std::move(o));
    tasks_.clear();
    return false;
  }
  return !tasks_.empty();
}

void BackupJob::add_task(const VdiInfo& vdi, const std::string& vm_name, const std::string& vm_uuid,
                         std::optional<std::vector<VdiInfo>> snapshots) {
  Task t;
  t.vdi = vdi;
  t.host_snapshots = std::move(snapshots);
  t.vm_name = vm_name;
  t.vm_uuid = vm_uuid;
  t.out.vdi_uuid = vdi.uuid;
  t.out.vdi_name = vdi.name;
  t.out.vm_name = vm_name;
  t.out.vm_uuid = vm_uuid;
  t.out.virtual_size = vdi.virtual_size;
  tasks_.push_back(std::move(t));
}

void BackupJob::skip(const VmInfo& vm, const VdiInfo* disk, const std::string& why) {
  Outcome o;
  o.vm_name = vm.name;
  o.vm_uuid = vm.uuid;
  if (disk) {
    o.vdi_uuid = disk->uuid;
    o.vdi_name = disk->name;
    o.virtual_size = disk->virtual_size;
  }
  o.skipped = why;
  ctx_.log("VM " + vm.name + (disk ? ", disk " + disk->name + " (" + disk->uuid + ")" : std::string()) +
           ": WARNING: not backed up: " + why);
  skipped.push_back(std::move(o));
}

void BackupJob::say(const Task& t, const std::string& msg) {
  ctx_.log("VDI " + t.vdi.uuid + " (" + (t.vm_name.empty() ? "" : t.vm_name + "/") + t.vdi.name + "): " + msg);
}

void BackupJob::fail(Task& t, const std::string& why) {
  if (t.out.error.empty()) t.out.error = why;
  t.out.ok = false;
  say(t, "FAILED: " + why);
}

// Lock each disk in the repository, remove leftovers of interrupted runs
// and make sure CBT is on, all before the snapshot.
void BackupJob::prepare() {
  bool all_locked = true;
  for (auto& t : tasks_) {
    try {
      if (t.vdi.is_snapshot) throw std::runtime_error("it is itself a snapshot; give the VDI it was taken of");
      auto latest = ctx_.repo->latest(t.vdi.uuid);
      PointInfo info;
      info.time = static_cast<int64_t>(std::time(nullptr));
      if (latest && info.time <= latest->time) info.time = latest->time + 1;
      info.virtual_size = t.vdi.virtual_size;
      info.vdi_name = t.vdi.name;
      info.vm_name = t.vm_name;
      info.vm_uuid = t.vm_uuid;
      t.writer = std::make_unique<PointWriter>(ctx_.repo, t.vdi.uuid, info, holder_text("cbtfs-ingest"));
    } catch (const std::exception& e) {
      fail(t, e.what());
      all_locked = false;
    }
  }
  // Another run may be working on the disks we could not lock: its
  // snapshot VM is not a leftover.
  if (vm_ && all_locked) remove_leftover_snapshot_vms();
  for (auto& t : tasks_) {
    if (!t.writer) continue;
    try {
      recover_journal(t);
      remove_leftover_snapshots(t, /*keep_metadata=*/true);
      if (!t.vdi.cbt_enabled) {
        c_.call("VDI.enable_cbt", {xapi::Value(t.vdi.ref)});
        t.cbt_was_off = true;
        say(t, "enabled changed block tracking");
      }
    } catch (const std::exception& e) {
      fail(t, e.what());
      t.writer.reset();
    }
  }
}

void BackupJob::recover_only(const VdiInfo& vdi) {
  Task t;
  t.vdi = vdi;
  recover_journal(t);
}

VdiInfo BackupJob::snapshot_only(const VdiInfo& vdi, const std::string& name) {
  Task t;
  t.vdi = vdi;
  snapshot_one(t);
  name_snapshot(t, name);  // should this fail, the journal stays: the next run removes the snapshot
  return *t.snap;
}

}  // namespace cbtfs::ingest
