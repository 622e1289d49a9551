// How many NBD connections the whole run may hold to each host, and who
// gets the next free one. XenServer's NBD server (xapi-nbd) serves at most
// 16 connections per host, across every client; past that it hangs up on
// new ones. Parallel disks each wanting several connections would get
// there quickly, so every connection of the run takes a slot here first.
//
// Invariant: at no time are more than per_host() slots of one host held.
// Fairness: a freed slot goes to the waiting job that holds the fewest
// slots of that host (a job's first connection before anyone's second),
// and among equals to the one that asked first.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

namespace cbtfs::ingest {

class HostBudget {
 public:
  explicit HostBudget(int per_host);
  HostBudget(const HostBudget&) = delete;
  HostBudget& operator=(const HostBudget&) = delete;

  int per_host() const { return per_host_; }

  // Of hosts (keys as host_key gives them), the one with the most room:
  // the fewest slots held and asked for. Ties go to the first listed.
  std::string pick(const std::vector<std::string>& hosts) const;

  // Slots held on host now, and the most ever held at once (for tests and
  // the log).
  int held(const std::string& host) const;
  int peak(const std::string& host) const;

  class Share;

  // One slot, given back when destroyed.
  class Slot {
   public:
    Slot() = default;
    Slot(Slot&& o) noexcept : share_(o.share_) { o.share_ = nullptr; }
    Slot& operator=(Slot&& o) noexcept;
    ~Slot() { reset(); }
    explicit operator bool() const { return share_ != nullptr; }
    void reset();

   private:
    friend class Share;
    explicit Slot(Share* s) : share_(s) {}
    Share* share_ = nullptr;
  };

  // One job's slots on one host. Must outlive its Slots.
  class Share {
   public:
    Share(HostBudget& budget, std::string host);
    Share(const Share&) = delete;
    Share& operator=(const Share&) = delete;
    const std::string& host() const { return host_; }
    int held() const;
    // Waits for a slot; an empty Slot once stop is requested first.
    Slot acquire(std::stop_token stop = {});

   private:
    friend class Slot;
    friend class HostBudget;
    void release();
    HostBudget& budget_;
    std::string host_;
    int held_ = 0;  // under budget_.mu_
  };

 private:
  struct Waiter {
    Share* share;
    uint64_t seq;
    bool granted = false;
  };
  struct HostState {
    int held = 0;
    int peak = 0;
    std::list<Waiter*> waiting;
  };
  // Hands free slots of h to its waiters, fewest held first. Under mu_.
  void grant(HostState& h);

  const int per_host_;
  mutable std::mutex mu_;
  std::condition_variable_any cv_;
  std::map<std::string, HostState> hosts_;
  uint64_t seq_ = 0;
};

}  // namespace cbtfs::ingest
