// Taking a job's snapshot: one VM.snapshot for a VM, a journaled
// Async.VDI.snapshot for one VDI; naming it ours; and settling the journal
// an interrupted run left.
#include <set>

#include <nlohmann/json.hpp>

#include "backup_job.hpp"
#include "cbtfs/format.hpp"

namespace cbtfs::ingest {

using xapi::TaskOutcome;
using xapi::cancel_task;
using xapi::destroy_task;
using xapi::wait_task;

void BackupJob::snapshot() {
  bool any = false;
  for (auto& t : tasks_) any = any || t.writer;
  if (!any) return;
  auto now = static_cast<int64_t>(std::time(nullptr));
  std::string name = ctx_.prefix + format_iso_time(now);
  try {
    if (vm_) {
      VmInfo snap = snapshot_vm(c_, *vm_, name);
      snapshot_vm_ref_ = snap.ref;
      for (auto& sd : snap.disks) {
        bool matched = false;
        for (auto& t : tasks_) {
          if (sd.snapshot_of == t.vdi.ref) {
            t.snap = sd;
            matched = true;
          }
        }
        if (!matched) {  // a disk we do not back up
          try {
            destroy_vdi(c_, sd.ref);
          } catch (const std::exception& e) {
            ctx_.log("cannot remove the snapshot of an excluded disk " + sd.uuid + ": " + e.what());
          }
        }
      }
    } else {
      snapshot_one(tasks_[0]);
    }
  } catch (const std::exception& e) {
    for (auto& t : tasks_) fail(t, std::string("snapshot failed: ") + e.what());
    return;
  }
  for (auto& t : tasks_) {
    if (!t.snap) {
      if (t.writer) fail(t, "the snapshot has no copy of this disk");
      continue;
    }
    // The name marks it as ours, so a later run can clean up after a crash.
    try {
      name_snapshot(t, name);
      if (t.writer) t.writer->set_source(t.snap->uuid, now);
    } catch (const std::exception& e) {
      fail(t, std::string("cannot name the snapshot: ") + e.what());
    }
  }
}

// One VDI's snapshot, journaled. VDI.snapshot cannot name its snapshot:
// until name_snapshot has, only this journal lets a later run (an ingest
// or a rollback) find it should we die or lose an answer.
void BackupJob::snapshot_one(Task& t) {
  nlohmann::json journal{{"snapshot_of", t.vdi.uuid}, {"existing", nlohmann::json::array()},
                         {"tasks", nlohmann::json::array()}};
  for (auto& s : t.host_snapshots ? *t.host_snapshots : fetch_snapshots(t)) journal["existing"].push_back(s.uuid);
  ctx_.repo->put_journal(t.vdi.uuid, journal.dump());
  t.journal = true;
  std::string task;
  try {
    task = start_snapshot_vdi(c_, t.vdi);
  } catch (const xapi::XapiError&) {
    ctx_.repo->clear_journal(t.vdi.uuid);  // the host refused: nothing to find
    t.journal = false;
    throw;
  }
  journal["tasks"].push_back(task);
  ctx_.repo->put_journal(t.vdi.uuid, journal.dump());
  t.snap = await_snapshot(t, task);
}

// The snapshot task `task` (journaled) to its end. A failure that leaves
// the task's outcome unknown is settled at once where the host lets us,
// so that no snapshot with data outlives the run; else the next run does.
VdiInfo BackupJob::await_snapshot(Task& t, const std::string& task) {
  TaskOutcome o;
  try {
    o = wait_task(c_, task, ctx_.opts.snapshot_timeout);
    if (o.state == TaskOutcome::State::Success && !o.result.empty()) {
      // The task stays until the snapshot bears our name: it is the
      // proof a next run needs should this one die before that.
      t.snapshot_task = task;
      return get_vdi(c_, o.result);
    }
  } catch (const std::exception&) {
    try {
      recover_journal(t);
      t.journal = false;
    } catch (const std::exception& e2) {
      say(t, std::string("the next run will clean up after this snapshot: ") + e2.what());
    }
    throw;
  }
  if (o.state == TaskOutcome::State::Pending) {
    cancel_task(c_, task);
    throw std::runtime_error("the host did not finish the snapshot within " +
                             std::to_string(ctx_.opts.snapshot_timeout) + " s (task " + task +
                             "); the next run removes it if it completes");
  }
  if (o.state == TaskOutcome::State::Failure) {
    destroy_task(c_, task);
    ctx_.repo->clear_journal(t.vdi.uuid);  // the host took nothing
    t.journal = false;
    throw xapi::XapiError("VDI.snapshot", o.error);
  }
  throw std::runtime_error("the snapshot task " + task + " ended without a result");
}

// The name marks the snapshot as ours; the journal and the task that
// proved it ours are then no longer needed.
void BackupJob::name_snapshot(Task& t, const std::string& name) {
  c_.call("VDI.set_name_label", {xapi::Value(t.snap->ref), xapi::Value(name)});
  t.snap->name = name;
  if (t.journal) ctx_.repo->clear_journal(t.vdi.uuid);
  t.journal = false;
  if (!t.snapshot_task.empty()) destroy_task(c_, t.snapshot_task);
  t.snapshot_task.clear();
}

// A journal means a run died, or lost an answer, between starting
// Async.VDI.snapshot and naming the snapshot (see snapshot_one). Only a
// snapshot the journaled task returned is provably ours and removed; any
// other that appeared meanwhile may be an admin's or another tool's, so
// it is reported with the command to remove it, never destroyed.
void BackupJob::recover_journal(Task& t) {
  auto text = ctx_.repo->journal(t.vdi.uuid);
  if (!text) return;
  std::set<std::string> existing;
  std::vector<std::string> tasks;
  try {
    auto j = nlohmann::json::parse(*text);
    for (auto& u : j.at("existing")) existing.insert(u.get<std::string>());
    if (j.contains("tasks"))
      for (auto& r : j.at("tasks")) tasks.push_back(r.get<std::string>());
  } catch (const nlohmann::json::exception& e) {
    say(t, std::string("ignoring an unreadable journal: ") + e.what());
    ctx_.repo->clear_journal(t.vdi.uuid);
    return;
  }
  bool proven = !tasks.empty();
  std::set<std::string> accounted;
  for (auto& task : tasks) {
    TaskOutcome o = wait_task(c_, task, ctx_.opts.snapshot_timeout);
    if (o.state == TaskOutcome::State::Pending)
      throw std::runtime_error("the snapshot an interrupted run started (task " + task +
                               ") is still being taken on the host; try again once it has finished");
    if (o.state == TaskOutcome::State::Gone) proven = false;
    if (o.state == TaskOutcome::State::Success && !o.result.empty()) {
      try {
        VdiInfo s = get_vdi(c_, o.result);
        accounted.insert(s.uuid);
        if (s.type != "cbt_metadata" && s.uuid != needed_snapshot(t) && !held_by_dom0(t, s)) {
          say(t, "removing snapshot " + s.uuid + ", taken by an interrupted run (task " + task + ")");
          destroy_vdi(c_, s.ref);
        }
      } catch (const xapi::XapiError& e) {
        if (e.code() != "HANDLE_INVALID") throw;  // already gone
      }
    }
    destroy_task(c_, task);
  }
  if (!proven) {
    for (auto& s : fetch_snapshots(t)) {
      if (existing.count(s.uuid) || accounted.count(s.uuid) || ours(s) || s.type == "cbt_metadata") continue;
      say(t, "snapshot " + s.uuid + " (taken " + format_iso_time(s.snapshot_time) +
                 ") appeared while an interrupted run was taking its snapshot, but nothing proves that run "
                 "took it: it may be an admin's or another tool's, so it is left alone. If it is not needed, "
                 "remove it with: xe vdi-destroy uuid=" + s.uuid);
    }
  }
  ctx_.repo->clear_journal(t.vdi.uuid);
  t.host_snapshots = fetch_snapshots(t);  // not the list the job loaded: this changed it
}

}  // namespace cbtfs::ingest
