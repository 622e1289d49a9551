#include "ingest.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "cbtfs/errors.hpp"
#include "cbtfs/human_bytes.hpp"
#include "changed_blocks.hpp"
#include "transfer.hpp"
#include "xapi_ops.hpp"

namespace cbtfs::ingest {

using xapi::TaskOutcome;
using xapi::cancel_task;
using xapi::destroy_task;
using xapi::wait_task;

namespace {

constexpr uint64_t kMaxExtentBlocks = 32;  // 2 MiB NBD requests

// One disk of the run, from lock to cleanup.
struct Task {
  VdiInfo vdi;
  std::string vm_name, vm_uuid;
  std::optional<VdiInfo> snap;
  std::unique_ptr<PointWriter> writer;
  bool cbt_was_off = false;
  bool journal = false;  // the repository holds a journal for this disk
  std::string snapshot_task;  // the Async.VDI.snapshot task, until the snapshot is named
  bool committed = false;
  Outcome out;
};

// A set of disks snapshotted together: a VM (one VM.snapshot) or one VDI.
struct Group {
  std::optional<VmInfo> vm;
  std::string snapshot_vm_ref;
  std::vector<size_t> tasks;
};


class Run {
 public:
  Run(xapi::Client& c, std::shared_ptr<Repository> repo, const Options& opts, const Log& log, ProgressReport* progress)
      : c_(c), repo_(std::move(repo)), opts_(opts), log_(log), budget_(opts.host_connections), progress_(progress) {
    // Our snapshots are named after the repository, so that a second
    // repository backing up the same disks leaves them alone.
    prefix_ = "cbtfs-ingest " + (repo_->id().empty() ? std::string() : repo_->id().substr(0, 8) + " ");
  }

  // For cbtfs-repo rollback (see ingest.hpp): one VDI, no point written.
  void recover_only(const VdiInfo& vdi) {
    Task t;
    t.vdi = vdi;
    recover_journal(t);
  }
  VdiInfo snapshot_only(const VdiInfo& vdi, const std::string& name) {
    Task t;
    t.vdi = vdi;
    snapshot_one(t);
    name_snapshot(t, name);  // should this fail, the journal stays: the next run removes the snapshot
    return *t.snap;
  }

  std::vector<Outcome> go() {
    select();
    for (auto& g : groups_) prepare(g);
    for (auto& g : groups_) snapshot(g);
    transfer_all();
    for (auto& g : groups_) finish(g);
    std::vector<Outcome> out;
    for (auto& e : errors_) out.push_back(e);
    for (auto& t : tasks_) {
      if (!t.out.ok) {
        try {
          if (auto latest = repo_->latest(t.vdi.uuid)) t.out.last_point_time = latest->time;
        } catch (const std::exception&) {
          // the repository cannot say: the metrics leave the time out
        }
      }
      out.push_back(t.out);
    }
    for (auto& s : skipped_) out.push_back(s);
    return out;
  }

 private:
  void say(const Task& t, const std::string& msg) {
    log_("VDI " + t.vdi.uuid + " (" + (t.vm_name.empty() ? "" : t.vm_name + "/") + t.vdi.name + "): " + msg);
  }

  void fail(Task& t, const std::string& why) {
    if (t.out.error.empty()) t.out.error = why;
    t.out.ok = false;
    say(t, "FAILED: " + why);
  }

  void add_task(Group& g, const VdiInfo& vdi, const std::string& vm_name, const std::string& vm_uuid) {
    if (!seen_.insert(vdi.uuid).second) return;
    Task t;
    t.vdi = vdi;
    t.vm_name = vm_name;
    t.vm_uuid = vm_uuid;
    t.out.vdi_uuid = vdi.uuid;
    t.out.vdi_name = vdi.name;
    t.out.vm_name = vm_name;
    t.out.vm_uuid = vm_uuid;
    t.out.virtual_size = vdi.virtual_size;
    g.tasks.push_back(tasks_.size());
    tasks_.push_back(std::move(t));
  }

  void select_error(const std::string& what, const std::string& why) {
    Outcome o;
    o.vdi_uuid = what;
    o.error = why;
    log_(what + ": FAILED: " + why);
    errors_.push_back(o);
  }

  void skip(const VmInfo& vm, const VdiInfo* disk, const std::string& why) {
    Outcome o;
    o.vm_name = vm.name;
    o.vm_uuid = vm.uuid;
    if (disk) {
      o.vdi_uuid = disk->uuid;
      o.vdi_name = disk->name;
      o.virtual_size = disk->virtual_size;
    }
    o.skipped = why;
    log_("VM " + vm.name + (disk ? ", disk " + disk->name + " (" + disk->uuid + ")" : std::string()) +
         ": WARNING: not backed up: " + why);
    skipped_.push_back(std::move(o));
  }

  // --all and --tag: every VM the filter keeps that is not named already.
  // A disk that cannot have changed block tracking is reported, not failed:
  // nobody asked for it by name, and the next run would fail it again.
  void select_from_pool(std::set<std::string>& vms_taken) {
    std::vector<PoolVm> found;
    try {
      found = select_vms(pool_vms(c_), opts_.pool);
    } catch (const std::exception& e) {
      select_error("the pool's VMs", e.what());
      return;
    }
    for (auto& pv : found) {
      if (!vms_taken.insert(pv.uuid).second) continue;
      try {
        Group g;
        g.vm = get_vm(c_, pv.ref);
        if (g.vm->disks.empty()) {
          skip(*g.vm, nullptr, "it has no disks");
          continue;
        }
        for (auto& d : g.vm->disks) {
          std::string why = enable_cbt_if_possible(c_, d);
          if (why.empty())
            add_task(g, d, g.vm->name, g.vm->uuid);
          else
            skip(*g.vm, &d, "it cannot have changed block tracking: " + why);
        }
        if (g.tasks.empty()) {
          skip(*g.vm, nullptr, "none of its disks can have changed block tracking");
          continue;
        }
        groups_.push_back(std::move(g));
      } catch (const std::exception& e) {
        select_error("VM " + pv.name + " (" + pv.uuid + ")", e.what());
      }
    }
  }

  void select() {
    std::set<std::string> vms_taken;
    for (auto& key : opts_.vms) {
      try {
        Group g;
        g.vm = find_vm(c_, key);
        if (g.vm->disks.empty()) throw std::runtime_error("VM '" + g.vm->name + "' has no disks");
        if (!vms_taken.insert(g.vm->uuid).second) continue;
        for (auto& d : g.vm->disks) add_task(g, d, g.vm->name, g.vm->uuid);
        groups_.push_back(std::move(g));
      } catch (const std::exception& e) {
        select_error("VM " + key, e.what());
      }
    }
    if (!opts_.pool.empty()) select_from_pool(vms_taken);
    for (auto& uuid : opts_.vdis) {
      try {
        Group g;
        VdiInfo vdi = vdi_by_uuid(c_, uuid);
        auto [vm_name, vm_uuid] = vm_of(c_, vdi);
        add_task(g, vdi, vm_name, vm_uuid);
        if (!g.tasks.empty()) groups_.push_back(std::move(g));
      } catch (const std::exception& e) {
        select_error("VDI " + uuid, e.what());
      }
    }
  }

  // Lock each disk in the repository, remove leftovers of interrupted runs
  // and make sure CBT is on, all before the snapshot.
  void prepare(Group& g) {
    bool all_locked = true;
    for (size_t i : g.tasks) {
      Task& t = tasks_[i];
      try {
        if (t.vdi.is_snapshot) throw std::runtime_error("it is itself a snapshot; give the VDI it was taken of");
        auto latest = repo_->latest(t.vdi.uuid);
        PointInfo info;
        info.time = static_cast<int64_t>(std::time(nullptr));
        if (latest && info.time <= latest->time) info.time = latest->time + 1;
        info.virtual_size = t.vdi.virtual_size;
        info.vdi_name = t.vdi.name;
        info.vm_name = t.vm_name;
        info.vm_uuid = t.vm_uuid;
        t.writer = std::make_unique<PointWriter>(repo_, t.vdi.uuid, info, holder_text("cbtfs-ingest"));
      } catch (const std::exception& e) {
        fail(t, e.what());
        all_locked = false;
      }
    }
    // Another run may be working on the disks we could not lock: its
    // snapshot VM is not a leftover.
    if (g.vm && all_locked) remove_leftover_snapshot_vms(g);
    for (size_t i : g.tasks) {
      Task& t = tasks_[i];
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

  bool ours(const VdiInfo& s) const { return s.name.rfind(prefix_, 0) == 0; }

  // The host snapshot the repository's newest point of this disk came from.
  std::string needed_snapshot(const Task& t) {
    auto latest = repo_->latest(t.vdi.uuid);
    return latest ? latest->snapshot_uuid : "";
  }

  std::vector<VdiInfo> snapshots_of(const Task& t) {
    std::vector<VdiInfo> out;
    xapi::Value rec = c_.call("VDI.get_record", {xapi::Value(t.vdi.ref)});
    if (!rec.has("snapshots")) return out;
    for (auto& ref : rec.at("snapshots").array()) {
      try {
        out.push_back(get_vdi(c_, ref.str()));
      } catch (const xapi::XapiError&) {
        // gone meanwhile
      }
    }
    return out;
  }

  // A VM snapshot of ours that still exists was left by a run that died
  // before finish(): its disks are copies nobody needs, except those whose
  // point was committed (they become metadata-only below).
  void remove_leftover_snapshot_vms(Group& g) {
    try {
      for (auto& ref : leftover_snapshot_vms(c_, *g.vm, prefix_)) {
        VmInfo sv = get_vm(c_, ref);
        log_("VM " + g.vm->name + ": removing '" + sv.name + "', left by an interrupted run");
        destroy_snapshot_vm(c_, ref);
        for (auto& sd : sv.disks) {
          Task* t = nullptr;
          for (size_t i : g.tasks)
            if (tasks_[i].vdi.ref == sd.snapshot_of) t = &tasks_[i];
          if (!t) {
            log_("VM " + g.vm->name + ": leaving snapshot " + sd.uuid + " (its disk is no longer part of the VM)");
            continue;
          }
          if (sd.uuid == needed_snapshot(*t) || sd.type == "cbt_metadata" || held_by_dom0(*t, sd)) continue;
          say(*t, "removing leftover snapshot " + sd.uuid);
          destroy_vdi(c_, sd.ref);
        }
      }
    } catch (const std::exception& e) {
      log_("VM " + g.vm->name + ": cannot remove what an interrupted run left: " + e.what());
    }
  }

  // A journal means a run died, or lost an answer, between starting
  // Async.VDI.snapshot and naming the snapshot (see snapshot()). Only a
  // snapshot the journaled task returned is provably ours and removed; any
  // other that appeared meanwhile may be an admin's or another tool's, so
  // it is reported with the command to remove it, never destroyed.
  void recover_journal(Task& t) {
    auto text = repo_->journal(t.vdi.uuid);
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
      repo_->clear_journal(t.vdi.uuid);
      return;
    }
    bool proven = !tasks.empty();
    std::set<std::string> accounted;
    for (auto& task : tasks) {
      TaskOutcome o = wait_task(c_, task, opts_.snapshot_timeout);
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
      for (auto& s : snapshots_of(t)) {
        if (existing.count(s.uuid) || accounted.count(s.uuid) || ours(s) || s.type == "cbt_metadata") continue;
        say(t, "snapshot " + s.uuid + " (taken " + format_iso_time(s.snapshot_time) +
                   ") appeared while an interrupted run was taking its snapshot, but nothing proves that run "
                   "took it: it may be an admin's or another tool's, so it is left alone. If it is not needed, "
                   "remove it with: xe vdi-destroy uuid=" + s.uuid);
      }
    }
    repo_->clear_journal(t.vdi.uuid);
  }

  // Snapshots our runs took that the repository does not need: with data
  // (left by a killed run) always, metadata-only ones once a newer point of
  // this repository is committed (keep_metadata false): only the newest
  // point's snapshot can be the start of the next delta. That includes one
  // whose point is gone from the repository (forgotten, pruned, or a
  // repository restored from an older copy): nothing refers to it any more.
  // Runs under the VDI's lock.
  void remove_leftover_snapshots(Task& t, bool keep_metadata) {
    auto points = repo_->points(t.vdi.uuid).points;
    std::string needed = points.empty() ? "" : points.back()->snapshot_uuid;
    for (auto& s : snapshots_of(t)) {
      if (!ours(s) || (t.snap && s.uuid == t.snap->uuid)) continue;
      if (held_by_dom0(t, s)) continue;
      if (s.uuid == needed) {
        if (s.type != "cbt_metadata") {  // committed, then the run died
          say(t, "making snapshot " + s.uuid + " metadata-only (its run was interrupted after the commit)");
          data_destroy(c_, s.ref);
        }
        continue;
      }
      if (s.type == "cbt_metadata" && keep_metadata) continue;
      say(t, std::string("removing ") + (s.type == "cbt_metadata" ? "superseded metadata-only" : "leftover") +
                 " snapshot " + s.uuid);
      destroy_vdi(c_, s.ref);
    }
  }

  // A snapshot a control domain still holds cannot be destroyed or made
  // metadata-only (VDI_IN_USE, after retrying for most of a minute): it is
  // reported, with what to do, and left for a later run.
  bool held_by_dom0(Task& t, const VdiInfo& s) {
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

  // The snapshot task `task` (journaled) to its end. A failure that leaves
  // the task's outcome unknown is settled at once where the host lets us,
  // so that no snapshot with data outlives the run; else the next run does.
  VdiInfo await_snapshot(Task& t, const std::string& task) {
    TaskOutcome o;
    try {
      o = wait_task(c_, task, opts_.snapshot_timeout);
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
      throw std::runtime_error("the host did not finish the snapshot within " + std::to_string(opts_.snapshot_timeout) +
                               " s (task " + task + "); the next run removes it if it completes");
    }
    if (o.state == TaskOutcome::State::Failure) {
      destroy_task(c_, task);
      repo_->clear_journal(t.vdi.uuid);  // the host took nothing
      t.journal = false;
      throw xapi::XapiError("VDI.snapshot", o.error);
    }
    throw std::runtime_error("the snapshot task " + task + " ended without a result");
  }

  // One VDI's snapshot, journaled. VDI.snapshot cannot name its snapshot:
  // until name_snapshot has, only this journal lets a later run (an ingest
  // or a rollback) find it should we die or lose an answer.
  void snapshot_one(Task& t) {
    nlohmann::json journal{{"snapshot_of", t.vdi.uuid}, {"existing", nlohmann::json::array()},
                           {"tasks", nlohmann::json::array()}};
    for (auto& s : snapshots_of(t)) journal["existing"].push_back(s.uuid);
    repo_->put_journal(t.vdi.uuid, journal.dump());
    t.journal = true;
    std::string task;
    try {
      task = start_snapshot_vdi(c_, t.vdi);
    } catch (const xapi::XapiError&) {
      repo_->clear_journal(t.vdi.uuid);  // the host refused: nothing to find
      t.journal = false;
      throw;
    }
    journal["tasks"].push_back(task);
    repo_->put_journal(t.vdi.uuid, journal.dump());
    t.snap = await_snapshot(t, task);
  }

  // The name marks the snapshot as ours; the journal and the task that
  // proved it ours are then no longer needed.
  void name_snapshot(Task& t, const std::string& name) {
    c_.call("VDI.set_name_label", {xapi::Value(t.snap->ref), xapi::Value(name)});
    t.snap->name = name;
    if (t.journal) repo_->clear_journal(t.vdi.uuid);
    t.journal = false;
    if (!t.snapshot_task.empty()) destroy_task(c_, t.snapshot_task);
    t.snapshot_task.clear();
  }

  void snapshot(Group& g) {
    bool any = false;
    for (size_t i : g.tasks) any = any || tasks_[i].writer;
    if (!any) return;
    auto now = static_cast<int64_t>(std::time(nullptr));
    std::string name = prefix_ + format_iso_time(now);
    try {
      if (g.vm) {
        VmInfo snap = snapshot_vm(c_, *g.vm, name);
        g.snapshot_vm_ref = snap.ref;
        for (auto& sd : snap.disks) {
          bool matched = false;
          for (size_t i : g.tasks) {
            Task& t = tasks_[i];
            if (sd.snapshot_of == t.vdi.ref) {
              t.snap = sd;
              matched = true;
            }
          }
          if (!matched) {  // a disk we do not back up
            try {
              destroy_vdi(c_, sd.ref);
            } catch (const std::exception& e) {
              log_("cannot remove the snapshot of an excluded disk " + sd.uuid + ": " + e.what());
            }
          }
        }
      } else {
        snapshot_one(tasks_[g.tasks[0]]);
      }
    } catch (const std::exception& e) {
      for (size_t i : g.tasks) fail(tasks_[i], std::string("snapshot failed: ") + e.what());
      return;
    }
    for (size_t i : g.tasks) {
      Task& t = tasks_[i];
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

  // Why this point cannot be a delta of the writer's parent, or "".
  std::string chain_break(Task& t, std::vector<bool>& bits) {
    auto parent = t.writer->parent();
    if (!parent) {
      auto latest = repo_->latest(t.vdi.uuid);
      return latest ? "virtual size changed from " + std::to_string(latest->virtual_size) + " to " +
                          std::to_string(t.vdi.virtual_size)
                    : "";
    }
    if (parent->snapshot_uuid.empty()) return "the previous point was not taken from this host";
    if (t.cbt_was_off) return "changed block tracking had been disabled on the host";
    std::string prev_ref;
    try {
      prev_ref = c_.call("VDI.get_by_uuid", {xapi::Value(parent->snapshot_uuid)}).str();
    } catch (const xapi::XapiError& e) {
      if (e.code() == "UUID_INVALID" || e.code() == "HANDLE_INVALID")
        return "the previous snapshot " + parent->snapshot_uuid + " is gone from the host";
      throw;
    }
    try {
      bits = decode_changed_blocks(list_changed_blocks(c_, prev_ref, t.snap->ref), block_count(t.vdi.virtual_size));
    } catch (const xapi::XapiError& e) {
      if (e.code() == "VDI_NO_CBT_METADATA") return "the previous snapshot has no changed-block metadata";
      if (e.code().rfind("SR_BACKEND_FAILURE_46", 0) == 0 || e.code().rfind("SR_BACKEND_FAILURE_45", 0) == 0)
        return "the host cannot relate the previous snapshot to this one (" + e.code() + ": " + e.param(1) + ")";
      throw;
    }
    return "";
  }

  void transfer_one(Task& t) {
    auto start = std::chrono::steady_clock::now();
    std::vector<bool> bits;
    std::string reason = chain_break(t, bits);
    bool full = !t.writer->parent() || !reason.empty();
    if (full && t.writer->parent()) t.writer->start_new_chain(reason);
    if (!reason.empty()) say(t, "starting a new full chain: " + reason);
    uint64_t nblocks = block_count(t.vdi.virtual_size);
    auto extents = full ? all_extents(nblocks, kMaxExtentBlocks) : changed_extents(bits, kMaxExtentBlocks);
    uint64_t todo = 0;
    for (auto& e : extents) todo += std::min<uint64_t>(e.count * kBlockSize, t.vdi.virtual_size - e.first * kBlockSize);
    auto targets = nbd_targets(c_, *t.snap);
    if (opts_.nbd.verify) {
      std::erase_if(targets, [](const nbd::Target& x) { return x.cert.empty(); });
      if (targets.empty() && !nbd_targets(c_, *t.snap).empty())
        throw std::runtime_error(
            "the host offers NBD only without TLS (an 'insecure_nbd' network); give --insecure-nbd to accept that");
    }
    if (targets.empty())
      throw std::runtime_error(
          "the host offers no NBD access: give a network the 'nbd' purpose (xe network-param-add "
          "param-name=purpose param-key=nbd uuid=...)");
    Source source = source_for(t, targets);
    say(t, std::string(full ? "full" : "incremental") + ": reading " + human_bytes(todo) + " over NBD from host " +
               source.host);
    total_ += todo;
    uint64_t counted = 0;
    auto stats = ingest::transfer(source, opts_.connections, extents, t.vdi.virtual_size, *t.writer,
                                  [&](uint64_t done) {
                                    done_ += done - counted;
                                    counted = done;
                                    show_progress();
                                  });
    Manifest m = t.writer->commit();
    t.committed = true;
    t.out.ok = true;
    t.out.full = full;
    t.out.chain_reason = m.chain_reason;
    t.out.point = format_point_name(m.time) + ".raw";
    t.out.last_point_time = m.time;
    t.out.snapshot_uuid = t.snap->uuid;
    t.out.blocks_changed = stats.blocks;
    t.out.bytes_read = stats.bytes_read;
    t.out.bytes_stored = m.bytes_stored;
    t.out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  // The host to read t from: of those get_nbd_info lists (each may have
  // several addresses), the one where the run holds the fewest connections.
  // Only that host's addresses are tried, so every connection counts
  // against the budget of the host it really goes to.
  Source source_for(Task& t, const std::vector<nbd::Target>& targets) {
    std::vector<std::string> hosts;
    for (auto& x : targets)
      if (std::find(hosts.begin(), hosts.end(), host_key(x)) == hosts.end()) hosts.push_back(host_key(x));
    Source s;
    s.host = budget_.pick(hosts);
    for (auto& x : targets)
      if (host_key(x) == s.host) s.targets.push_back(x);
    s.opts = opts_.nbd;
    s.budget = &budget_;
    s.busy_timeout = opts_.busy_timeout;
    s.log = [this, &t](const std::string& m) { say(t, m); };
    t.out.nbd_host = s.host;
    return s;
  }

  void show_progress() {
    std::lock_guard g(progress_mu_);
    if (progress_) progress_->update(done_, total_);
  }

  void transfer_all() {
    std::vector<size_t> ready;
    for (size_t i = 0; i < tasks_.size(); ++i)
      if (tasks_[i].writer && tasks_[i].snap && tasks_[i].out.error.empty()) ready.push_back(i);
    if (progress_) progress_->start();
    std::atomic<size_t> next{0};
    auto worker = [&] {
      for (size_t k; (k = next++) < ready.size();) {
        Task& t = tasks_[ready[k]];
        try {
          transfer_one(t);
        } catch (const std::exception& e) {
          fail(t, e.what());
        }
      }
    };
    std::vector<std::thread> threads;
    int n = std::max(1, std::min<int>(opts_.jobs, static_cast<int>(ready.size())));
    for (int i = 0; i < n; ++i) threads.emplace_back(worker);
    for (auto& th : threads) th.join();
    if (progress_) progress_->finish();
  }

  // NBD connections are closed by now. The snapshot VM record goes first
  // (its VBDs would keep the disks in use), then each snapshot becomes
  // metadata-only, or is destroyed when its point did not commit.
  void finish(Group& g) {
    if (!g.snapshot_vm_ref.empty()) {
      try {
        destroy_snapshot_vm(c_, g.snapshot_vm_ref);
      } catch (const std::exception& e) {
        log_("cannot remove the snapshot VM record: " + std::string(e.what()));
      }
    }
    for (size_t i : g.tasks) {
      Task& t = tasks_[i];
      if (t.snap) settle_snapshot(t);
      t.writer.reset();  // releases the lock; an uncommitted pack vanishes with it
    }
  }

  void settle_snapshot(Task& t) {
    if (!t.committed) {
      try {
        destroy_vdi(c_, t.snap->ref);
        if (t.journal) repo_->clear_journal(t.vdi.uuid);
        if (!t.snapshot_task.empty()) destroy_task(c_, t.snapshot_task);
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

  xapi::Client& c_;
  std::shared_ptr<Repository> repo_;
  std::string prefix_;
  const Options& opts_;
  const Log& log_;
  std::vector<Task> tasks_;
  std::vector<Group> groups_;
  std::vector<Outcome> errors_;
  std::vector<Outcome> skipped_;
  std::set<std::string> seen_;
  HostBudget budget_;  // NBD connections per host, shared by the parallel transfers
  std::mutex progress_mu_;
  ProgressReport* progress_;
  std::atomic<uint64_t> total_{0}, done_{0};
};

}  // namespace

void recover_interrupted_snapshot(xapi::Client& client, std::shared_ptr<Repository> repo, const VdiInfo& vdi,
                                  const Options& opts, const Log& log) {
  Run(client, std::move(repo), opts, log, nullptr).recover_only(vdi);
}

VdiInfo take_named_snapshot(xapi::Client& client, std::shared_ptr<Repository> repo, const VdiInfo& vdi,
                            const std::string& name, const Options& opts, const Log& log) {
  return Run(client, std::move(repo), opts, log, nullptr).snapshot_only(vdi, name);
}

std::vector<Outcome> run(xapi::Client& client, std::shared_ptr<Repository> repo, const Options& opts, const Log& log,
                         ProgressReport* progress) {
  return Run(client, std::move(repo), opts, log, progress).go();
}

}  // namespace cbtfs::ingest
