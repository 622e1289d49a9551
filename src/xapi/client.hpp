// A XAPI session over XML-RPC (HTTPS by default, libcurl). Calls return the
// Value of a Success envelope; a Failure becomes a XapiError carrying XAPI's
// code and parameters and a message an admin can act on.
#pragma once

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "xmlrpc.hpp"

namespace cbtfs::xapi {

class XapiError : public std::runtime_error {
 public:
  XapiError(std::string method, std::vector<std::string> description);
  const std::string& code() const { return description_.front(); }
  const std::vector<std::string>& description() const { return description_; }
  const std::string& method() const { return method_; }
  std::string param(size_t i) const { return i + 1 < description_.size() ? description_[i + 1] : ""; }

 private:
  std::string method_;
  std::vector<std::string> description_;
};

// Transport failures: DNS, connect, TLS, timeouts, HTTP errors.
class TransportError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ClientOptions {
  std::string url;  // https://host or http://host
  std::string user;
  std::string password;
  std::string ca_file;  // empty: the system's CAs
  bool insecure = false;
  long timeout_seconds = 600;  // per call
  int retries = 3;              // of read-only calls after a transport or protocol failure
};

class Client {
 public:
  explicit Client(ClientOptions opts);
  ~Client();  // logs out
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  void login();
  void logout() noexcept;
  // Calls method with the session prepended; one re-login on SESSION_INVALID;
  // read-only calls (get_*, list_changed_blocks) retried with backoff after
  // a timeout, a dropped connection, HTTP 5xx or a garbled answer.
  // Thread-safe: calls are serialized on one connection, kept alive from
  // call to call. Threads that call a lot each want a Client of their own.
  Value call(const std::string& method, std::vector<Value> args = {});
  const std::string& session() const { return session_; }
  const std::string& url() const { return opts_.url; }
  // What the client was built with (url as above), for requests of its
  // own that go beside the XML-RPC calls, such as an upload.
  const ClientOptions& options() const { return opts_; }
  // The URL given, when login found a pool member there and moved to its
  // master (url() is then the master's); empty otherwise.
  const std::string& redirected_from() const { return redirected_from_; }
  // Sum of calls made, for tests and the log.
  size_t calls() const { return calls_; }

 private:
  Value raw_call(const std::string& method, const std::vector<Value>& params);
  // may_resend: libcurl may send the call again on a new connection when
  // the kept-alive one closed before an answer came (read-only calls).
  std::string post(const std::string& body, bool may_resend);

  ClientOptions opts_;
  std::mutex mu_;
  void* curl_ = nullptr;
  std::string session_;
  std::string redirected_from_;
  size_t calls_ = 0;
};

}  // namespace cbtfs::xapi
