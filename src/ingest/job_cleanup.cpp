// What a job leaves on the host: leftovers of interrupted runs removed,
// its own snapshots made metadata-only once committed (destroyed if not),
// superseded ones removed, and a snapshot a control domain holds reported.
#include <algorithm>

#include "backup_job.hpp"
#include "cbtfs/human_bytes.hpp"

namespace cbtfs::ingest {

// The records of the snapshots the host lists for the disk now.
std::vector<VdiInfo> BackupJob::fetch_snapshots(const Task& t) {
  std::vector<VdiInfo> out;
  for (auto& ref : get_vdi(c_, t.vdi.ref).snapshots) {
    try {
      out.push_back(get_vdi(c_, ref));
    } catch (const xapi::XapiError& e) {
      if (e.code() != "HANDLE_INVALID") throw;  // gone meanwhile
    }
  }
  return out;
}

// Those the disk's record listed when the job loaded it, read once: the
// job keeps the list up to date with what it destroys.
std::vector<VdiInfo>& BackupJob::known_snapshots(Task& t) {
  if (!t.host_snapshots) {
    t.host_snapshots.emplace();
    for (auto& ref : t.vdi.snapshots) {
      try {
        t.host_snapshots->push_back(get_vdi(c_, ref));
      } catch (const xapi::XapiError& e) {
        if (e.code() != "HANDLE_INVALID") throw;  // gone meanwhile
      }
    }
  }
  return *t.host_snapshots;
}

// The host snapshot the repository's newest point of this disk came from.
std::string BackupJob::needed_snapshot(const Task& t) {
  auto latest = ctx_.repo->latest(t.vdi.uuid);
  return latest ? latest->snapshot_uuid : "";
}

// A VM snapshot of ours that still exists was left by a run that died
// before finish(): its disks are copies nobody needs, except those whose
// point was committed (they become metadata-only below).
void BackupJob::remove_leftover_snapshot_vms() {
  try {
    for (auto& ref : leftover_snapshot_vms(c_, *vm_, ctx_.prefix)) {
      VmInfo sv = get_vm(c_, ref);
      ctx_.log("VM " + vm_->name + ": removing '" + sv.name + "', left by an interrupted run");
      destroy_snapshot_vm(c_, ref);
      for (auto& sd : sv.disks) {
        Task* t = nullptr;
        for (auto& task : tasks_)
          if (task.vdi.ref == sd.snapshot_of) t = &task;
        if (!t) {
          ctx_.log("VM " + vm_->name + ": leaving snapshot " + sd.uuid + " (its disk is no longer part of the VM)");
          continue;
        }
        if (sd.uuid == needed_snapshot(*t) || sd.type == "cbt_metadata" || held_by_dom0(*t, sd)) continue;
        say(*t, "removing leftover snapshot " + sd.uuid);
        destroy_vdi(c_, sd.ref);
        if (t->host_snapshots) std::erase_if(*t->host_snapshots, [&](const VdiInfo& s) { return s.ref == sd.ref; });
      }
    }
  } catch (const std::exception& e) {
    ctx_.log("VM " + vm_->name + ": cannot remove what an interrupted run left: " + e.what());
  }
}

// Snapshots our runs took that the repository does not need: with data
// (left by a killed run) always, metadata-only ones once a newer point of
// this repository is committed (keep_metadata false): only the newest
// point's snapshot can be the start of the next delta. That includes one
// whose point is gone from the repository (forgotten, pruned, or a
// repository restored from an older copy): nothing refers to it any more.
// Runs under the VDI's lock.
void BackupJob::remove_leftover_snapshots(Task& t, bool keep_metadata) {
  auto points = ctx_.repo->points(t.vdi.uuid).points;
  std::string needed = points.empty() ? "" : points.back()->snapshot_uuid;
  auto& snapshots = known_snapshots(t);
  for (auto it = snapshots.begin(); it != snapshots.end();) {
    VdiInfo& s = *it;
    if (!ours(s) || (t.snap && s.uuid == t.snap->uuid) || held_by_dom0(t, s)) {
      ++it;
      continue;
    }
    if (s.uuid == needed) {
      if (s.type != "cbt_metadata") {  // committed, then the run died
        say(t, "making snapshot " + s.uuid + " metadata-only (its run was interrupted after the commit)");
        data_destroy(c_, s.ref);
        s.type = "cbt_metadata";
        s.vbds.clear();  // data_destroy takes them away
      }
      ++it;
      continue;
    }
    if (s.type == "cbt_metadata" && keep_metadata) {
      ++it;
      continue;
    }
    say(t, std::string("removing ") + (s.type == "cbt_metadata" ? "superseded metadata-only" : "leftover") +
               " snapshot " + s.uuid);
    destroy_vdi(c_, s.ref);
    it = snapshots.erase(it);
  }
}

// A snapshot a control domain still holds cannot be destroyed or made
// metadata-only (VDI_IN_USE, after retrying for most of a minute): it is
// reported, with what to do, and left for a later run.
bool BackupJob::held_by_dom0(Task& t, const VdiInfo& s) {
  if (s.vbds.empty()) return false;
  auto held = dom0_attachments(c_, s);
  for (auto& a : held) {
    std::string w = "snapshot " + s.uuid + " is " + (a.plugged ? "plugged into" : "attached to") + " " + a.vm_name +
                    " (VBD " + a.vbd_uuid + "), as an NBD transfer that was cut off leaves it; it stays on the host "
                    "until that VBD goes. If no backup or other tool is reading the disk now: xe vbd-unplug uuid=" +
                    a.vbd_uuid + "; xe vbd-destroy uuid=" + a.vbd_uuid;
    if (std::find(t.out.warnings.begin(), t.out.warnings.end(), w) != t.out.warnings.end()) continue;
    say(t, "WARNING: " + w);
    t.out.warnings.push_back(w);
  }
  return !held.empty();
}

// NBD connections are closed by now. The snapshot VM record goes first
// (its VBDs would keep the disks in use), then each snapshot becomes
// metadata-only, or is destroyed when its point did not commit.
void BackupJob::finish() {
  if (!snapshot_vm_ref_.empty()) {
    try {
      destroy_snapshot_vm(c_, snapshot_vm_ref_);
    } catch (const std::exception& e) {
      ctx_.log("cannot remove the snapshot VM record: " + std::string(e.what()));
    }
  }
  for (auto& t : tasks_) {
    if (t.snap) settle_snapshot(t);
    t.writer.reset();  // releases the lock; an uncommitted pack vanishes with it
  }
}

void BackupJob::settle_snapshot(Task& t) {
  if (!t.committed) {
    try {
      destroy_vdi(c_, t.snap->ref);
      if (t.journal) ctx_.repo->clear_journal(t.vdi.uuid);
      if (!t.snapshot_task.empty()) xapi::destroy_task(c_, t.snapshot_task);
    } catch (const std::exception& e) {
      fail(t, "cannot remove the snapshot " + t.snap->uuid + " from the host: " + e.what());
    }
    return;
  }
  try {
    data_destroy(c_, t.snap->ref);
  } catch (const std::exception& e) {
    // The point is safe in the repository, but the host still holds the
    // snapshot's data: better a full next run than a leaked disk copy.
    try {
      destroy_vdi(c_, t.snap->ref);
      say(t, std::string("cannot make the snapshot metadata-only (") + e.what() +
                 "); destroyed it, so the next run is a full one");
    } catch (const std::exception& e2) {
      fail(t, "the point is committed, but the snapshot " + t.snap->uuid +
                  " still holds data on the host and cannot be removed: " + e2.what());
    }
    return;
  }
  try {
    remove_leftover_snapshots(t, /*keep_metadata=*/false);
  } catch (const std::exception& e) {
    say(t, std::string("cannot remove superseded snapshots: ") + e.what());
  }
  say(t, "point " + t.out.point + " committed: " + (t.out.full ? "full, " : "") + std::to_string(t.out.blocks_changed) +
             " blocks read, " + human_bytes(t.out.bytes_stored) + " stored");
}

}  // namespace cbtfs::ingest
