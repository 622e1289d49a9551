// NBD connections with libnbd's asynchronous API, so that connects and
// reads have deadlines: a server that stops answering is a failure, not a
// hang.
#include "nbd_reader.hpp"
#include "tls_bridge.hpp"

#include <libnbd.h>
#include <netdb.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

namespace cbtfs::nbd {

namespace {

nbd_handle* H(void* h) { return static_cast<nbd_handle*>(h); }

std::string last_error() {
  const char* e = nbd_get_error();
  return e ? e : "unknown NBD error";
}

// Does host name `name` resolve to `address`? Then the certificate can be
// checked against the name the host itself put in it.
bool resolves_to(const std::string& name, const std::string& address) {
  if (name.empty()) return false;
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (getaddrinfo(name.c_str(), nullptr, &hints, &res) != 0) return false;
  bool found = false;
  for (addrinfo* a = res; a && !found; a = a->ai_next) {
    char host[NI_MAXHOST];
    if (getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, nullptr, 0, NI_NUMERICHOST) == 0)
      found = address == host;
  }
  freeaddrinfo(res);
  return found;
}

}  // namespace

Connection::Connection(const std::vector<Target>& targets, const Options& opts) : targets_(targets), opts_(opts) {
  if (targets_.empty()) throw NbdError("XAPI offered no NBD address for this disk");
  auto backoff = opts_.backoff;
  for (int attempt = 0;; ++attempt) {
    try {
      connect();
      return;
    } catch (const ServerBusy&) {
      if (!opts_.retry_busy || attempt >= opts_.retries) throw;
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
    } catch (const UntrustedServer&) {
      throw;  // the same certificate will come back
    } catch (const NbdError&) {
      if (attempt >= opts_.retries) throw;
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
    }
  }
}

Connection::~Connection() {
  disconnect();
  if (!certdir_.empty()) std::filesystem::remove_all(certdir_);
}

void Connection::disconnect() noexcept {
  if (!h_) return;
  nbd_shutdown(H(h_), 0);
  nbd_close(H(h_));
  h_ = nullptr;
  bridge_.reset();
}

void Connection::connect() {
  std::string errors;
  size_t hung_up = 0;    // targets that closed the connection during the handshake
  size_t untrusted = 0;  // targets whose certificate is not the one XAPI gave
  for (auto& t : targets_) {
    disconnect();
    nbd_handle* h = nbd_create();
    if (!h) throw NbdError("cannot create an NBD handle: " + last_error());
    h_ = h;
    bool tls = !t.cert.empty();
    bool named = resolves_to(t.subject, t.address);
    int rc = nbd_set_export_name(h, t.exportname.c_str());
    // A buffer is used only once its read succeeded, so libnbd's zeroing of
    // it first would only cost a pass over every byte read.
    if (rc == 0) rc = nbd_set_pread_initialize(h, false);
    if (rc == 0 && tls && opts_.verify && !named) {
      // libnbd would check the address against a certificate that names
      // a host: the pin is checked by the bridge instead.
      try {
        bridge_ = std::make_unique<TlsBridge>(t.address, t.port, t.cert, opts_.timeout);
      } catch (const ServerBusy& e) {
        ++hung_up;
        errors += std::string("; ") + e.what();
        continue;
      } catch (const UntrustedServer& e) {
        ++untrusted;
        errors += std::string("; ") + e.what();
        continue;
      } catch (const NbdError& e) {
        errors += std::string("; ") + e.what();
        continue;
      }
      rc = nbd_set_tls(h, LIBNBD_TLS_DISABLE);
      if (rc == 0) rc = nbd_aio_connect_socket(h, bridge_->take_client_fd());
    } else if (rc == 0 && tls) {
      // The host's own certificate is the only trust anchor: a pin, not a
      // CA search. libnbd reads it as ca-cert.pem from a directory.
      if (certdir_.empty()) {
        const char* tmp = std::getenv("TMPDIR");
        std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/cbtfs-nbd-XXXXXX";
        if (!mkdtemp(tmpl.data())) throw NbdError(std::string("cannot create a temporary directory: ") + strerror(errno));
        certdir_ = tmpl.c_str();
      }
      std::ofstream(certdir_ + "/ca-cert.pem") << t.cert;
      rc = nbd_set_tls(h, LIBNBD_TLS_REQUIRE);
      if (rc == 0) rc = nbd_set_tls_certificates(h, certdir_.c_str());
      if (rc == 0) rc = nbd_set_tls_verify_peer(h, opts_.verify);
    }
    if (rc == 0 && !bridge_) rc = nbd_aio_connect_tcp(h, (named ? t.subject : t.address).c_str(), t.port.c_str());
    auto deadline = std::chrono::steady_clock::now() + opts_.timeout;
    while (rc == 0 && nbd_aio_is_connecting(h)) {
      if (std::chrono::steady_clock::now() > deadline) {
        rc = -1;
        errors += "; " + t.address + ":" + t.port + ": timed out";
        break;
      }
      if (nbd_poll(h, 1000) == -1) rc = -1;
    }
    if (rc == 0 && nbd_aio_is_ready(h)) {
      int64_t size = nbd_get_size(h);
      if (size >= 0) {
        size_ = static_cast<uint64_t>(size);
        return;
      }
    }
    std::string why = last_error();
    if (why.find("server disconnected unexpectedly") != std::string::npos) ++hung_up;
    if (tls && opts_.verify && why.find("certificate") != std::string::npos) {
      ++untrusted;
      why += " (the NBD server's certificate does not match the one XAPI gave; --insecure-nbd skips the check)";
    }
    if (errors.find(t.address + ":" + t.port + ": timed out") == std::string::npos)
      errors += "; " + t.address + ":" + t.port + ": " + why;
  }
  disconnect();
  if (hung_up == targets_.size())
    throw ServerBusy("the NBD server closed every connection during the handshake (XenServer's NBD server "
                     "does this when it already serves its 16 connections, counting other tools'; or it "
                     "refused the export)" + errors);
  if (untrusted == targets_.size()) throw UntrustedServer("no NBD address can be trusted" + errors);
  throw NbdError("cannot connect to any NBD address" + errors);
}

bool Connection::try_pread(uint64_t offset, std::span<std::byte> out, std::string& why) {
  if (!h_) {
    try {
      connect();
    } catch (const NbdError& e) {
      why = e.what();
      return false;
    }
  }
  nbd_handle* h = H(h_);
  int64_t cookie = nbd_aio_pread(h, out.data(), out.size(), offset, nbd_completion_callback{}, 0);
  if (cookie == -1) {
    why = last_error();
    return false;
  }
  auto deadline = std::chrono::steady_clock::now() + opts_.timeout;
  for (;;) {
    int done = nbd_aio_command_completed(h, cookie);
    if (done == 1) return true;
    if (done == -1) {
      why = last_error();
      return false;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      why = "no answer within " + std::to_string(opts_.timeout.count()) + " s";
      return false;
    }
    if (nbd_poll(h, 1000) == -1) {
      why = last_error();
      return false;
    }
  }
}

void Connection::pread_batch(const std::vector<Request>& reqs) {
  enum State { kPending, kDone, kFailed };
  std::vector<State> state(reqs.size(), kFailed);
  std::vector<int64_t> cookies(reqs.size(), -1);
  if (h_) {
    nbd_handle* h = H(h_);
    size_t pending = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      cookies[i] = nbd_aio_pread(h, reqs[i].out.data(), reqs[i].out.size(), reqs[i].offset, nbd_completion_callback{}, 0);
      if (cookies[i] != -1) {
        state[i] = kPending;
        ++pending;
      }
    }
    auto deadline = std::chrono::steady_clock::now() + opts_.timeout;
    while (pending) {
      for (size_t i = 0; i < reqs.size(); ++i) {
        if (state[i] != kPending) continue;
        int done = nbd_aio_command_completed(h, cookies[i]);
        if (done == 0) continue;
        state[i] = done == 1 ? kDone : kFailed;
        if (done == 1) bytes_read_ += reqs[i].out.size();
        --pending;
      }
      if (!pending || std::chrono::steady_clock::now() > deadline || nbd_poll(h, 1000) == -1) break;
    }
    // Still in flight after a failure: the handle goes, and with it the
    // commands that were using these buffers.
    if (pending) disconnect();
  }
  for (size_t i = 0; i < reqs.size(); ++i)
    if (state[i] != kDone) pread(reqs[i].offset, reqs[i].out);
}

void Connection::pread(uint64_t offset, std::span<std::byte> out) {
  auto backoff = opts_.backoff;
  std::string why;
  for (int attempt = 0;; ++attempt) {
    if (try_pread(offset, out, why)) {
      bytes_read_ += out.size();
      return;
    }
    if (attempt >= opts_.retries)
      throw NbdError("NBD read of " + std::to_string(out.size()) + " bytes at offset " + std::to_string(offset) +
                     " failed after " + std::to_string(attempt + 1) + " attempts: " + why);
    disconnect();  // the next attempt reconnects
    std::this_thread::sleep_for(backoff);
    backoff *= 2;
  }
}

}  // namespace cbtfs::nbd
