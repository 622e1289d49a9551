// Readers of an S3 repository announce themselves, since S3 has no flock:
// one small object per reader, claims/<key>/<token>, rewritten every quarter
// of the lease by one thread per storage (started with the first reader, so
// in a mount's daemon after its fork). Whoever wants to remove <key> looks
// for leases younger than the lease time by the gateway's own clock.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "cbtfs/storage.hpp"
#include "s3_client.hpp"

namespace cbtfs::s3 {

class ReaderLeases {
 public:
  ReaderLeases(Client& c, int lease_seconds) : c_(c), lease_(lease_seconds) {}
  ~ReaderLeases();
  ReaderLeases(const ReaderLeases&) = delete;
  ReaderLeases& operator=(const ReaderLeases&) = delete;

  // prefix: the full key below which the leases of one object live.
  std::unique_ptr<Claim> shared(const std::string& prefix);
  // nullptr while a live lease is there; the claim is not exact (a reader
  // may announce itself right after): alone() looks again.
  std::unique_ptr<Claim> exclusive(const std::string& prefix);

  // Used by the claims themselves.
  bool any_live(const std::string& prefix);
  void drop(const std::string& key) noexcept;

 private:
  void refresher();

  Client& c_;
  int lease_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> live_;  // lease key -> body
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace cbtfs::s3
