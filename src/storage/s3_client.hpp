// Signed S3 requests over libcurl: one call, one HTTP exchange (plus
// retries of transient failures). Knows HTTP and SigV4, not the repository.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <optional>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "cbtfs/s3_storage.hpp"

namespace cbtfs::s3 {

struct Request {
  Request(std::string m, std::string k) : method(std::move(m)), key(std::move(k)) {}
  Request& param(const std::string& name, const std::string& value) {
    query[name] = value;
    return *this;
  }
  Request& header(std::string h) {
    headers.push_back(std::move(h));
    return *this;
  }
  Request& with_body(std::span<const std::byte> b) {
    body = b;
    return *this;
  }
  // A PUT body read from the file fd (offsets 0 to size), a bounded buffer
  // at a time, so a large part need not be in memory. The caller keeps fd
  // open until send() returns.
  Request& with_file_body(int fd, uint64_t size) {
    body_fd = fd;
    body_fd_size = size;
    return *this;
  }
  uint64_t body_size() const { return body_fd >= 0 ? body_fd_size : body.size(); }
  Request& range(uint64_t first, uint64_t length) {
    range_first = first;
    range_length = length;
    return *this;
  }
  Request& until(std::chrono::steady_clock::time_point t) {
    deadline = t;
    return *this;
  }

  std::string method;  // GET, HEAD, PUT, POST, DELETE
  std::string key;     // object key below the bucket; "" for the bucket
  std::map<std::string, std::string> query;  // sorted, as SigV4 wants them
  std::vector<std::string> headers;          // "Name: value"
  std::span<const std::byte> body;
  int body_fd = -1;  // instead of body when >= 0 (PUT only)
  uint64_t body_fd_size = 0;
  uint64_t range_first = 0, range_length = 0;  // a ranged GET when range_length > 0
  // A request that must be over by then, answered or abandoned, retries
  // included (a writer's commit must land within its lease, or not at all).
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

struct Response {
  long status = 0;
  std::vector<std::byte> body;
  std::map<std::string, std::string> headers;  // names lower-case
  std::string header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? "" : it->second;
  }
  std::string text() const { return std::string(reinterpret_cast<const char*>(body.data()), body.size()); }
  // The <Code> of an S3 error body, e.g. "NoSuchKey"; "" when none.
  std::string error_code() const;
};

class Client {
 public:
  explicit Client(S3Config config);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Any HTTP status is returned; only transport failures that outlast the
  // retries throw (StorageError). 5xx and 429 answers are retried too.
  // A request with a deadline is abandoned when it passes: StorageError
  // with ETIMEDOUT, and a 5xx then stays the answer.
  Response send(const Request& r);
  // For messages: "s3://bucket/prefix".
  std::string describe() const;
  const S3Config& config() const { return config_; }

 private:
  Response send_once(const Request& r, std::string& transport_error);
  void* take_handle();
  void give_handle(void* h);

  S3Config config_;
  bool debug_ = false, stats_ = false;
  std::mutex mu_;
  std::vector<void*> idle_;  // CURL easy handles: they keep their connections
  std::atomic<uint64_t> requests_{0};
  std::map<std::string, uint64_t> by_method_;  // under mu_
};

// Percent-encodes for a URL path ('/' kept) or a query value ('/' encoded).
std::string uri_encode(const std::string& s, bool keep_slash);

}  // namespace cbtfs::s3
