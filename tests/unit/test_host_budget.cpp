// The per-host NBD connection budget: never more than its slots held on a
// host, whatever the threads do; a job's first slot before anyone's extra;
// a waiter that is told to stop leaves with nothing.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "ingest/host_budget.hpp"

using namespace cbtfs::ingest;
using namespace std::chrono_literals;

namespace {
// Waits until pred holds, at most 5 s.
template <class P>
bool eventually(P pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}
}  // namespace

TEST_CASE("Sixteen jobs of four connections never hold more than the budget of a host") {
  HostBudget budget(5);
  // Catch2's assertions are not thread-safe: the threads count, the test checks.
  std::atomic<int> now{0}, most{0}, empty_slots{0};
  std::vector<std::thread> jobs;
  for (int j = 0; j < 16; ++j)
    jobs.emplace_back([&, j] {
      HostBudget::Share share(budget, "xs1");
      std::vector<std::thread> conns;
      for (int c = 0; c < 4; ++c)
        conns.emplace_back([&, seed = j * 4 + c] {
          std::mt19937 rnd(seed);
          for (int round = 0; round < 20; ++round) {
            HostBudget::Slot s = share.acquire();
            if (!s) ++empty_slots;
            int n = ++now;
            int m = most.load();
            while (n > m && !most.compare_exchange_weak(m, n)) {
            }
            std::this_thread::sleep_for(std::chrono::microseconds(rnd() % 300));
            --now;
          }
        });
      for (auto& t : conns) t.join();
    });
  for (auto& t : jobs) t.join();
  CHECK(empty_slots.load() == 0);
  CHECK(most.load() <= 5);
  CHECK(budget.peak("xs1") == 5);
  CHECK(budget.held("xs1") == 0);
}

TEST_CASE("A freed slot goes to a job without one before a job asking for more") {
  HostBudget budget(2);
  HostBudget::Share a(budget, "xs1"), b(budget, "xs1");
  HostBudget::Slot a1 = a.acquire(), a2 = a.acquire();
  REQUIRE(budget.held("xs1") == 2);

  std::stop_source stop_a3;
  std::atomic<bool> a3_done{false}, b1_done{false};
  HostBudget::Slot a3, b1;
  std::thread extra([&] {  // a's third, asked for first
    a3 = a.acquire(stop_a3.get_token());
    a3_done = true;
  });
  std::this_thread::sleep_for(50ms);
  std::thread first([&] {
    b1 = b.acquire();
    b1_done = true;
  });
  std::this_thread::sleep_for(50ms);
  CHECK(!a3_done);
  CHECK(!b1_done);

  a2.reset();  // b holds none, a holds one: b's turn, although a asked first
  REQUIRE(eventually([&] { return b1_done.load(); }));
  first.join();
  CHECK(!a3_done);
  CHECK(b.held() == 1);
  CHECK(a.held() == 1);

  stop_a3.request_stop();  // the transfer needs no more connections
  extra.join();
  CHECK(!a3);
  CHECK(budget.held("xs1") == 2);
  CHECK(budget.peak("xs1") == 2);
}

TEST_CASE("Hosts have budgets of their own, and a new job goes where the fewest are held") {
  HostBudget budget(1);
  HostBudget::Share x(budget, "xs1"), y(budget, "xs2");
  HostBudget::Slot sx = x.acquire();
  HostBudget::Slot sy = y.acquire();  // not kept waiting by xs1's slot
  CHECK(budget.held("xs1") == 1);
  CHECK(budget.held("xs2") == 1);
  sy.reset();
  CHECK(budget.pick({"xs1", "xs2", "xs3"}) == "xs2");
  CHECK(budget.pick({"xs1"}) == "xs1");
  sx.reset();
  CHECK(budget.pick({"xs1", "xs2"}) == "xs1");  // a tie: the first listed
  CHECK_THROWS(HostBudget(0));
}
