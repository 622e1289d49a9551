// Reads a VDI over NBD (libnbd) the way XenServer's server needs it:
// several connections (it serves one request at a time per connection),
// 512-byte aligned reads, TLS verified against the certificate XAPI hands
// out, and a dropped connection retried with backoff before giving up.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace cbtfs::nbd {

class TlsBridge;

class NbdError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Every address hung up on us during the handshake. That is how XenServer's
// NBD server says "Server busy" (it already serves its 16 connections: it
// closes a new one before the greeting, and logs the reason only on the
// host), and also how it refuses an export name.
class ServerBusy : public NbdError {
 public:
  using NbdError::NbdError;
};

// Every address answered with a certificate other than the one XAPI gave:
// not a server to wait for, so nothing retries it.
class UntrustedServer : public NbdError {
 public:
  using NbdError::NbdError;
};

// One record of VDI.get_nbd_info.
struct Target {
  std::string address;
  std::string port;
  std::string exportname;  // opaque and secret (it carries the session): never logged
  std::string cert;        // PEM; empty for insecure_nbd
  std::string subject;
};

struct Options {
  bool verify = true;        // --insecure turns it off
  int retries = 5;           // per read, each after a reconnect
  std::chrono::milliseconds backoff{500};  // doubled per retry
  std::chrono::seconds timeout{60};        // per connect and per read
  bool retry_busy = true;  // false: ServerBusy from the constructor at once, for the caller to wait out
};

// One connection. Not thread-safe: give each worker its own.
class Connection {
 public:
  // Tries the targets in turn; throws NbdError when none works.
  Connection(const std::vector<Target>& targets, const Options& opts);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  uint64_t size() const { return size_; }
  // Reads exactly out.size() bytes at offset, reconnecting on failure.
  void pread(uint64_t offset, std::span<std::byte> out);
  struct Request {
    uint64_t offset;
    std::span<std::byte> out;
  };
  // Several reads in flight at once on this connection (the server answers
  // them in turn, but no round trip is wasted between them); any that fails
  // is retried on its own like pread.
  void pread_batch(const std::vector<Request>& reqs);
  uint64_t bytes_read() const { return bytes_read_; }

 private:
  void connect();
  void disconnect() noexcept;
  bool try_pread(uint64_t offset, std::span<std::byte> out, std::string& why);

  std::vector<Target> targets_;
  Options opts_;
  void* h_ = nullptr;  // struct nbd_handle*
  std::unique_ptr<TlsBridge> bridge_;  // TLS done by us (see tls_bridge.hpp), when in use
  std::string certdir_;
  uint64_t size_ = 0;
  uint64_t bytes_read_ = 0;
};

}  // namespace cbtfs::nbd
