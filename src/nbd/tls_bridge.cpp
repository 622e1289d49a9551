#include "tls_bridge.hpp"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "cbtfs/full_io.hpp"
#include "nbd_reader.hpp"

namespace cbtfs::nbd {

namespace {

// The fixed-newstyle handshake up to STARTTLS (the NBD protocol, "Option
// haggling"): what the server says first, and the one option we send.
constexpr char kGreetingMagic[] = "NBDMAGICIHAVEOPT";
constexpr size_t kGreetingSize = 18;  // 2 magics, 16-bit handshake flags
constexpr uint32_t kFlagNoZeroes = 2;
constexpr uint32_t kClientFixedNewstyle = 1;
constexpr uint32_t kOptStartTls = 5;
constexpr uint64_t kReplyMagic = 0x3e889045565a9;
constexpr uint32_t kRepAck = 1;

SSL* S(void* p) { return static_cast<SSL*>(p); }

std::string ssl_error() {
  char buf[256] = "unknown TLS error";
  if (unsigned long e = ERR_get_error()) ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return buf;
}

void put32(std::string& out, uint32_t v) {
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<char>(v >> (8 * i)));
}
uint64_t get_be(const unsigned char* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | p[i];
  return v;
}

void read_exact(int fd, void* buf, size_t n, const char* what) {
  auto r = io::read_all(fd, buf, n);
  if (r.bytes < n)
    throw NbdError(std::string("NBD server: ") + what + ": " + (r.error ? strerror(r.error) : "connection closed"));
}

void write_all(int fd, const void* buf, size_t n) {
  if (auto r = io::write_all(fd, buf, n); r.error)
    throw NbdError(std::string("NBD server: cannot send: ") + strerror(r.error));
}

int connect_tcp(const std::string& address, const std::string& port, std::chrono::seconds timeout) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int e = getaddrinfo(address.c_str(), port.c_str(), &hints, &res))
    throw NbdError(address + ":" + port + ": " + gai_strerror(e));
  std::string why = "no address";
  int fd = -1;
  for (addrinfo* a = res; a && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof err;
      if (::poll(&p, 1, static_cast<int>(timeout.count() * 1000)) == 1 &&
          ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0)
        rc = 0;
      else
        errno = err ? err : ETIMEDOUT;
    }
    if (rc != 0) {
      why = strerror(errno);
      ::close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) throw NbdError(address + ":" + port + ": " + why);
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  timeval tv{static_cast<time_t>(timeout.count()), 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // requests are small and latency-bound
  return fd;
}

// Waits until fd is ready for `events`; false on timeout or a stop request.
bool wait_for(int fd, short events, int stop) {
  pollfd p[2] = {{fd, events, 0}, {stop, POLLIN, 0}};
  int r;
  do r = ::poll(p, 2, 60000);
  while (r < 0 && errno == EINTR);
  return r > 0 && !p[1].revents;
}

}  // namespace

TlsBridge::TlsBridge(const std::string& address, const std::string& port, const std::string& pinned_pem,
                     std::chrono::seconds timeout) {
  struct Cleanup {
    TlsBridge* b;
    bool armed = true;
    ~Cleanup() {
      if (armed) b->release();
    }
  } cleanup{this};

  tcp_ = connect_tcp(address, port, timeout);
  std::string where = address + ":" + port;
  unsigned char g[kGreetingSize];
  if (auto r = io::read_all(tcp_, g, sizeof g); r.bytes == 0 && !r.error)
    throw ServerBusy(where + ": the server hung up before its greeting");
  else if (r.bytes < sizeof g)
    throw NbdError(where + ": NBD server: no greeting: " + (r.error ? strerror(r.error) : "connection closed"));
  if (std::memcmp(g, kGreetingMagic, 16) != 0) throw NbdError(where + ": not a newstyle NBD server");
  std::string hello;
  put32(hello, kClientFixedNewstyle | (get_be(g + 16, 2) & kFlagNoZeroes));  // what libnbd will say too
  hello.append("IHAVEOPT", 8);
  put32(hello, kOptStartTls);
  put32(hello, 0);
  write_all(tcp_, hello.data(), hello.size());
  unsigned char reply[20];
  read_exact(tcp_, reply, sizeof reply, "no answer to STARTTLS");
  std::vector<char> rest(get_be(reply + 16, 4) & 0xffff);
  if (!rest.empty()) read_exact(tcp_, rest.data(), rest.size(), "short answer to STARTTLS");
  if (get_be(reply, 8) != kReplyMagic || get_be(reply + 12, 4) != kRepAck)
    throw NbdError(where + ": the NBD server refused TLS");

  auto* ctx = SSL_CTX_new(TLS_client_method());
  ctx_ = ctx;
  if (!ctx) throw NbdError("cannot set up TLS: " + ssl_error());
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);  // the pin below is the whole check
  ssl_ = SSL_new(ctx);
  if (!ssl_ || SSL_set_fd(S(ssl_), tcp_) != 1) throw NbdError("cannot set up TLS: " + ssl_error());
  if (SSL_connect(S(ssl_)) != 1) throw NbdError(where + ": TLS handshake failed: " + ssl_error());

  BIO* bio = BIO_new_mem_buf(pinned_pem.data(), static_cast<int>(pinned_pem.size()));
  X509* pinned = bio ? PEM_read_bio_X509(bio, nullptr, nullptr, nullptr) : nullptr;
  BIO_free(bio);
  X509* peer = SSL_get1_peer_certificate(S(ssl_));
  bool same = pinned && peer && X509_cmp(pinned, peer) == 0;
  X509_free(pinned);
  X509_free(peer);
  if (!pinned) throw NbdError("the certificate XAPI gave for " + where + " cannot be read");
  if (!same)
    throw UntrustedServer(where + ": the NBD server's certificate is not the one XAPI gave for it (certificate pinning)");

  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
    throw NbdError(std::string("socketpair: ") + strerror(errno));
  local_ = pair[0];
  client_ = pair[1];
  stop_ = ::eventfd(0, EFD_CLOEXEC);
  if (stop_ < 0) throw NbdError(std::string("eventfd: ") + strerror(errno));
  write_all(local_, g, sizeof g);  // libnbd reads the server's greeting first
  ::fcntl(tcp_, F_SETFL, ::fcntl(tcp_, F_GETFL) | O_NONBLOCK);
  thread_ = std::thread([this] { relay(); });
  cleanup.armed = false;
}

TlsBridge::~TlsBridge() { release(); }

void TlsBridge::release() noexcept {
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(stop_, &one, sizeof one);
    thread_.join();
  }
  if (ssl_) SSL_free(S(ssl_));
  if (ctx_) SSL_CTX_free(static_cast<SSL_CTX*>(ctx_));
  ssl_ = ctx_ = nullptr;
  for (int* fd : {&tcp_, &local_, &client_, &stop_})
    if (*fd >= 0) ::close(std::exchange(*fd, -1));
}

int TlsBridge::take_client_fd() { return std::exchange(client_, -1); }

// Plain bytes from libnbd into the TLS session and back, until either side
// closes or the bridge is stopped. libnbd's client flags are dropped: we
// sent the same ones before STARTTLS.
void TlsBridge::relay() noexcept {
  std::vector<char> buf(256 << 10);
  size_t skip = 4;
  auto ssl_write_all = [&](const char* p, size_t n) {
    while (n) {
      int r = SSL_write(S(ssl_), p, static_cast<int>(n));
      if (r > 0) {
        p += r;
        n -= static_cast<size_t>(r);
        continue;
      }
      int e = SSL_get_error(S(ssl_), r);
      if (e == SSL_ERROR_WANT_WRITE && wait_for(tcp_, POLLOUT, stop_)) continue;
      if (e == SSL_ERROR_WANT_READ && wait_for(tcp_, POLLIN, stop_)) continue;
      return false;
    }
    return true;
  };
  for (bool open = true; open;) {
    // Everything TLS has decrypted goes to libnbd before we sleep again.
    for (;;) {
      int r = SSL_read(S(ssl_), buf.data(), static_cast<int>(buf.size()));
      if (r > 0) {
        try {
          write_all(local_, buf.data(), static_cast<size_t>(r));
        } catch (const NbdError&) {
          open = false;
          break;
        }
        continue;
      }
      int e = SSL_get_error(S(ssl_), r);
      if (e == SSL_ERROR_WANT_WRITE && wait_for(tcp_, POLLOUT, stop_)) continue;
      if (e != SSL_ERROR_WANT_READ) open = false;
      break;
    }
    if (!open) break;
    pollfd p[3] = {{tcp_, POLLIN, 0}, {local_, POLLIN, 0}, {stop_, POLLIN, 0}};
    if (::poll(p, 3, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p[2].revents) break;
    if (p[1].revents) {
      ssize_t n = ::read(local_, buf.data(), buf.size());
      if (n <= 0) break;
      size_t k = std::min(skip, static_cast<size_t>(n));
      skip -= k;
      if (static_cast<size_t>(n) > k && !ssl_write_all(buf.data() + k, static_cast<size_t>(n) - k)) break;
    }
  }
  ::shutdown(local_, SHUT_RDWR);  // libnbd sees the connection end
}

}  // namespace cbtfs::nbd
