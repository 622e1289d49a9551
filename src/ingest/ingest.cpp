#include "ingest.hpp"

#include <algorithm>
#include <atomic>
#include <set>
#include <thread>
#include <tuple>

#include "backup_job.hpp"
#include "run_context.hpp"
#include "xapi_ops.hpp"

namespace cbtfs::ingest {

namespace {

// A XAPI connection of a worker's own, with its own session: a Client
// serializes its calls, and the workers' calls are many and short. Only
// when the host refuses another session does the worker share the run's.
std::unique_ptr<xapi::Client> own_connection(xapi::Client& shared) {
  auto c = std::make_unique<xapi::Client>(shared.options());
  c->login();
  return c;
}

class Run {
 public:
  Run(xapi::Client& c, std::shared_ptr<Repository> repo, const Options& opts, const Log& log, ProgressReport* progress)
      : c_(c), ctx_(std::move(repo), opts, log, progress) {}

  std::vector<Outcome> go() {
    select();
    run_jobs();
    std::vector<Outcome> out = errors_;
    for (auto& j : jobs_) out.insert(out.end(), j.errors.begin(), j.errors.end());
    for (auto& j : jobs_) out.insert(out.end(), j.outcomes.begin(), j.outcomes.end());
    for (auto& j : jobs_) out.insert(out.end(), j.skipped.begin(), j.skipped.end());
    return out;
  }

 private:
  struct Job {
    JobSpec spec;
    std::vector<Outcome> outcomes, skipped, errors;
  };

  void select_error(const std::string& what, const std::string& why) {
    Outcome o;
    o.vdi_uuid = what;
    o.error = why;
    ctx_.log(what + ": FAILED: " + why);
    errors_.push_back(o);
  }

  void add_vm_job(VmInfo vm, bool from_pool, std::string what) {
    Job j;
    j.spec.vm = std::move(vm);
    j.spec.from_pool = from_pool;
    j.spec.what = std::move(what);
    jobs_.push_back(std::move(j));
  }

  // Which VMs and VDIs, found by the few calls that name them; their disks
  // are the jobs' to read.
  void select() {
    std::set<std::string> vms_taken;
    // With VMs named alone, each job looks its VM up itself, side by side
    // with the others. Else they are looked up now: --tag, --all and --vdi
    // leave out the VMs named.
    if (ctx_.opts.pool.empty() && ctx_.opts.vdis.empty()) {
      for (auto& key : ctx_.opts.vms) {
        Job j;
        j.spec.vm_key = key;
        j.spec.what = "VM " + key;
        jobs_.push_back(std::move(j));
      }
      return;
    }
    for (auto& key : ctx_.opts.vms) {
      try {
        VmInfo vm = find_vm(c_, key);
        if (vms_taken.insert(vm.uuid).second) add_vm_job(std::move(vm), false, "VM " + key);
      } catch (const std::exception& e) {
        select_error("VM " + key, e.what());
      }
    }
    if (!ctx_.opts.pool.empty()) {
      try {
        for (auto& pv : select_vms(pool_vms(c_), ctx_.opts.pool)) {
          if (!vms_taken.insert(pv.uuid).second) continue;
          VmInfo vm;
          vm.ref = pv.ref;
          vm.uuid = pv.uuid;
          vm.name = pv.name;
          vm.vbds = pv.vbds;
          vm.snapshots = pv.snapshots;
          add_vm_job(std::move(vm), true, "VM " + pv.name + " (" + pv.uuid + ")");
        }
      } catch (const std::exception& e) {
        select_error("the pool's VMs", e.what());
      }
    }
    for (auto& uuid : ctx_.opts.vdis) {
      try {
        Job j;
        j.spec.vdi = vdi_by_uuid(c_, uuid);
        std::tie(j.spec.vm_name, j.spec.vm_uuid) = vm_of(c_, *j.spec.vdi);
        // A disk of a VM backed up whole goes with that VM's snapshot.
        if (!j.spec.vm_uuid.empty() && vms_taken.count(j.spec.vm_uuid)) continue;
        jobs_.push_back(std::move(j));
      } catch (const std::exception& e) {
        select_error("VDI " + uuid, e.what());
      }
    }
  }

  // --jobs workers take the jobs in order. The first uses the run's
  // connection, the others their own.
  void run_jobs() {
    std::atomic<size_t> next{0};
    auto worker = [&](bool first) {
      std::unique_ptr<xapi::Client> own;
      if (!first) {
        try {
          own = own_connection(c_);
        } catch (const std::exception& e) {
          ctx_.log("a worker shares the run's XAPI connection: " + std::string(e.what()));
        }
      }
      for (size_t k; (k = next++) < jobs_.size();) {
        BackupJob job(ctx_, own ? *own : c_);
        job.run(jobs_[k].spec, claims_);
        jobs_[k].outcomes = std::move(job.outcomes);
        jobs_[k].skipped = std::move(job.skipped);
        jobs_[k].errors = std::move(job.errors);
      }
    };
    int n = std::max(1, std::min<int>(ctx_.opts.jobs, static_cast<int>(jobs_.size())));
    std::vector<std::thread> threads;
    for (int i = 1; i < n; ++i) threads.emplace_back(worker, false);
    worker(true);
    for (auto& th : threads) th.join();
    ctx_.finish_progress();
  }

  xapi::Client& c_;
  RunContext ctx_;
  std::vector<Job> jobs_;
  std::vector<Outcome> errors_;
  Claims claims_;
};

}  // namespace

void recover_interrupted_snapshot(xapi::Client& client, std::shared_ptr<Repository> repo, const VdiInfo& vdi,
                                  const Options& opts, const Log& log) {
  RunContext ctx(std::move(repo), opts, log, nullptr);
  BackupJob(ctx, client).recover_only(vdi);
}

VdiInfo take_named_snapshot(xapi::Client& client, std::shared_ptr<Repository> repo, const VdiInfo& vdi,
                            const std::string& name, const Options& opts, const Log& log) {
  RunContext ctx(std::move(repo), opts, log, nullptr);
  return BackupJob(ctx, client).snapshot_only(vdi, name);
}

std::vector<Outcome> run(xapi::Client& client, std::shared_ptr<Repository> repo, const Options& opts, const Log& log,
                         ProgressReport* progress) {
  return Run(client, std::move(repo), opts, log, progress).go();
}

}  // namespace cbtfs::ingest
