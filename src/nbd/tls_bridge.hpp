// TLS to an NBD server verified by the certificate alone, for hosts whose
// certificate names a host that does not resolve to the address XAPI gives
// (a dedicated backup network). libnbd 1.14 checks the name it connected to
// against the certificate and cannot be told another one (no
// nbd_set_tls_hostname), so here the greeting and STARTTLS are done by us,
// the server must present exactly the certificate XAPI handed out (a pin:
// the handshake proves it holds the key), and libnbd speaks plain NBD over
// a socketpair whose other end a thread relays into the TLS session.
#pragma once

#include <chrono>
#include <string>
#include <thread>

namespace cbtfs::nbd {

class TlsBridge {
 public:
  // Connects, negotiates STARTTLS and checks the pin; throws NbdError.
  TlsBridge(const std::string& address, const std::string& port, const std::string& pinned_pem,
            std::chrono::seconds timeout);
  ~TlsBridge();
  TlsBridge(const TlsBridge&) = delete;
  TlsBridge& operator=(const TlsBridge&) = delete;

  // libnbd's end, once (nbd_aio_connect_socket takes ownership of it).
  int take_client_fd();

 private:
  void relay() noexcept;
  void release() noexcept;

  int tcp_ = -1;
  int local_ = -1;   // the relay's end of the socketpair
  int client_ = -1;  // libnbd's end until taken
  int stop_ = -1;    // eventfd: wakes the relay to end
  void* ctx_ = nullptr;  // SSL_CTX*
  void* ssl_ = nullptr;  // SSL*
  std::thread thread_;
};

}  // namespace cbtfs::nbd
