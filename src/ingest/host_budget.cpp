#include "host_budget.hpp"

#include <algorithm>
#include <stdexcept>

namespace cbtfs::ingest {

HostBudget::HostBudget(int per_host) : per_host_(per_host) {
  if (per_host < 1) throw std::invalid_argument("a host needs at least one NBD connection");
}

std::string HostBudget::pick(const std::vector<std::string>& hosts) const {
  if (hosts.empty()) throw std::invalid_argument("no host to choose from");
  std::lock_guard g(mu_);
  auto load = [&](const std::string& host) {
    auto it = hosts_.find(host);
    return it == hosts_.end() ? size_t{0} : static_cast<size_t>(it->second.held) + it->second.waiting.size();
  };
  std::string best = hosts.front();
  for (auto& h : hosts)
    if (load(h) < load(best)) best = h;
  return best;
}

int HostBudget::held(const std::string& host) const {
  std::lock_guard g(mu_);
  auto it = hosts_.find(host);
  return it == hosts_.end() ? 0 : it->second.held;
}

int HostBudget::peak(const std::string& host) const {
  std::lock_guard g(mu_);
  auto it = hosts_.find(host);
  return it == hosts_.end() ? 0 : it->second.peak;
}

void HostBudget::grant(HostState& h) {
  bool any = false;
  while (h.held < per_host_ && !h.waiting.empty()) {
    auto best = std::min_element(h.waiting.begin(), h.waiting.end(), [](const Waiter* a, const Waiter* b) {
      return a->share->held_ != b->share->held_ ? a->share->held_ < b->share->held_ : a->seq < b->seq;
    });
    Waiter* w = *best;
    h.waiting.erase(best);
    w->granted = true;
    ++w->share->held_;
    h.peak = std::max(h.peak, ++h.held);
    any = true;
  }
  if (any) cv_.notify_all();
}

HostBudget::Share::Share(HostBudget& budget, std::string host) : budget_(budget), host_(std::move(host)) {}

int HostBudget::Share::held() const {
  std::lock_guard g(budget_.mu_);
  return held_;
}

HostBudget::Slot HostBudget::Share::acquire(std::stop_token stop) {
  std::unique_lock lk(budget_.mu_);
  HostState& h = budget_.hosts_[host_];
  Waiter w{this, budget_.seq_++};
  h.waiting.push_back(&w);
  budget_.grant(h);
  budget_.cv_.wait(lk, stop, [&] { return w.granted; });
  if (!w.granted) {
    h.waiting.remove(&w);
    return Slot();
  }
  return Slot(this);
}

void HostBudget::Share::release() {
  std::lock_guard g(budget_.mu_);
  HostState& h = budget_.hosts_[host_];
  --held_;
  --h.held;
  budget_.grant(h);
}

HostBudget::Slot& HostBudget::Slot::operator=(Slot&& o) noexcept {
  if (this != &o) {
    reset();
    share_ = o.share_;
    o.share_ = nullptr;
  }
  return *this;
}

void HostBudget::Slot::reset() {
  if (share_) share_->release();
  share_ = nullptr;
}

}  // namespace cbtfs::ingest
