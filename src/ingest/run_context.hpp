// What the backup jobs of one run share: the repository, the options, the
// log, the NBD connection budget per host, the slots for transfers, and the
// progress. Set up once before the jobs start; what changes is guarded.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <semaphore>
#include <string>

#include "cbtfs/repository.hpp"
#include "host_budget.hpp"
#include "ingest.hpp"

namespace cbtfs::ingest {

class RunContext {
 public:
  RunContext(std::shared_ptr<Repository> repo, const Options& opts, const Log& log, ProgressReport* progress);

  std::shared_ptr<Repository> repo;
  const Options& opts;
  const Log& log;  // the caller's, which takes lines from several threads
  // Our snapshots are named after the repository, so that a second
  // repository backing up the same disks leaves them alone.
  std::string prefix;
  HostBudget budget;  // NBD connections per host, across every transfer of the run

  // What each transfer may read ahead of its writer. The run's memory is
  // bounded by the run, not by --jobs: 96 MiB shared among the transfer
  // slots, at most 64 MiB and at least 8 MiB (two batches) each. At 50 ms
  // round trips 96 MiB in flight is about 2 GB/s for the run.
  size_t read_ahead() const;

  // --jobs disks copy at once, whichever jobs they belong to: a job that
  // holds a VM of several disks copies them side by side, each in a slot.
  class Slot {
   public:
    explicit Slot(RunContext& r) : r_(r) { r_.slots_.acquire(); }
    ~Slot() { r_.slots_.release(); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    RunContext& r_;
  };

  // Progress of the copying: the total grows as each disk learns what
  // changed. The first call starts the report; finish_progress ends it.
  void add_to_copy(uint64_t bytes);
  void copied(uint64_t bytes);
  void finish_progress();

 private:
  void show();

  std::counting_semaphore<16> slots_;
  std::mutex progress_mu_;
  ProgressReport* progress_;
  bool progress_started_ = false;
  uint64_t total_ = 0, done_ = 0;
};

}  // namespace cbtfs::ingest
