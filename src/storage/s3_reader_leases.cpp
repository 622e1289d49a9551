#include "s3_reader_leases.hpp"

#include <curl/curl.h>
#include <pugixml.hpp>

#include <cstdio>
#include <ctime>
#include <random>

#include "cbtfs/errors.hpp"

namespace cbtfs::s3 {

namespace {

std::string token() {
  std::random_device rd;
  char buf[40];
  std::snprintf(buf, sizeof buf, "%08x%08x%08x%08x", rd(), rd(), rd(), rd());
  return buf;
}

// ListObjectsV2's LastModified: "2026-11-29T21:11:13.000Z"; -1 when unreadable.
time_t iso_time(const std::string& s) {
  std::tm tm{};
  if (std::sscanf(s.c_str(), "%4d-%2d-%2dT%2d:%2d:%2d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
                  &tm.tm_sec) != 6)
    return -1;
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  return timegm(&tm);
}

std::span<const std::byte> bytes_of(const std::string& s) { return std::as_bytes(std::span(s)); }

class ReaderClaim final : public Claim {
 public:
  ReaderClaim(ReaderLeases& owner, std::string key) : owner_(owner), key_(std::move(key)) {}
  ~ReaderClaim() override { owner_.drop(key_); }

 private:
  ReaderLeases& owner_;
  std::string key_;
};

class RemoverClaim final : public Claim {
 public:
  RemoverClaim(ReaderLeases& owner, std::string prefix) : owner_(owner), prefix_(std::move(prefix)) {}
  bool exact() const override { return false; }
  bool alone() override { return !owner_.any_live(prefix_); }

 private:
  ReaderLeases& owner_;
  std::string prefix_;
};

}  // namespace

ReaderLeases::~ReaderLeases() {
  {
    std::lock_guard g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::unique_ptr<Claim> ReaderLeases::shared(const std::string& prefix) {
  std::string key = prefix + "/" + token();
  std::string body = "reader lease, rewritten every " + std::to_string(lease_ / 4) + " s\n";
  Response r = c_.send(Request("PUT", key).with_body(bytes_of(body)));
  if (r.status != 200) throw StorageError("cannot register a reader at " + c_.describe() + "/" + key + ": HTTP " +
                                              std::to_string(r.status), EIO);
  std::lock_guard g(mu_);
  live_[key] = body;
  if (!thread_.joinable()) thread_ = std::thread([this] { refresher(); });
  return std::make_unique<ReaderClaim>(*this, key);
}

std::unique_ptr<Claim> ReaderLeases::exclusive(const std::string& prefix) {
  if (any_live(prefix)) return nullptr;
  return std::make_unique<RemoverClaim>(*this, prefix);
}

// Leases of readers that died stop being rewritten and age out; they are
// removed when seen, so that they do not pile up.
bool ReaderLeases::any_live(const std::string& prefix) {
  Response r = c_.send(Request("GET", "").param("list-type", "2").param("prefix", prefix + "/"));
  if (r.status != 200) throw StorageError("cannot list the readers under " + c_.describe() + "/" + prefix, EIO);
  time_t now = curl_getdate(r.header("date").c_str(), nullptr);
  pugi::xml_document doc;
  if (!doc.load_buffer(r.body.data(), r.body.size()))
    throw StorageError("unreadable listing of " + c_.describe() + "/" + prefix, EIO);
  bool live = false;
  for (auto n : doc.child("ListBucketResult").children("Contents")) {
    time_t modified = iso_time(n.child_value("LastModified"));
    if (now < 0 || modified < 0 || now - modified < lease_) {
      live = true;
    } else {
      c_.send(Request("DELETE", n.child_value("Key")));
    }
  }
  return live;
}

void ReaderLeases::drop(const std::string& key) noexcept {
  {
    std::lock_guard g(mu_);
    live_.erase(key);
  }
  try {
    c_.send(Request("DELETE", key));
  } catch (const std::exception&) {
    // it ages out
  }
}

void ReaderLeases::refresher() {
  std::unique_lock g(mu_);
  while (!cv_.wait_for(g, std::chrono::milliseconds(lease_ * 1000 / 4), [this] { return stop_; })) {
    auto now = live_;
    g.unlock();
    for (auto& [key, body] : now) {
      try {
        c_.send(Request("PUT", key).with_body(bytes_of(body)));
        std::unique_lock again(mu_);
        if (!live_.count(key)) {  // dropped meanwhile: our PUT must not outlive its DELETE
          again.unlock();
          c_.send(Request("DELETE", key));
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "cbtfs: cannot renew the reader lease %s: %s\n", key.c_str(), e.what());
      }
    }
    g.lock();
  }
}

}  // namespace cbtfs::s3
