#include "run_context.hpp"

#include <algorithm>

namespace cbtfs::ingest {

RunContext::RunContext(std::shared_ptr<Repository> r, const Options& o, const Log& l, ProgressReport* progress)
    : repo(std::move(r)),
      opts(o),
      log(l),
      budget(o.host_connections),
      slots_(std::clamp(o.jobs, 1, 16)),
      progress_(progress) {
  prefix = "cbtfs-ingest " + (repo->id().empty() ? std::string() : repo->id().substr(0, 8) + " ");
}

size_t RunContext::read_ahead() const {
  constexpr size_t kRunReadAhead = 96 << 20, kMost = 64 << 20, kLeast = 8 << 20;
  return std::clamp(kRunReadAhead / static_cast<size_t>(std::clamp(opts.jobs, 1, 16)), kLeast, kMost);
}

void RunContext::add_to_copy(uint64_t bytes) {
  std::lock_guard g(progress_mu_);
  total_ += bytes;
  show();
}

void RunContext::copied(uint64_t bytes) {
  std::lock_guard g(progress_mu_);
  done_ += bytes;
  show();
}

void RunContext::finish_progress() {
  std::lock_guard g(progress_mu_);
  if (progress_ && progress_started_) progress_->finish();
  progress_started_ = false;
}

void RunContext::show() {
  if (!progress_) return;
  if (!progress_started_) progress_->start();  // when the first disk starts copying, not at the snapshots
  progress_started_ = true;
  progress_->update(done_, total_);
}

}  // namespace cbtfs::ingest
