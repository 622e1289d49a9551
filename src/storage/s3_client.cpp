#include "s3_client.hpp"

#include <curl/curl.h>
#include <unistd.h>
#include <pugixml.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <thread>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"

namespace cbtfs::s3 {

namespace {

struct CurlInit {
  CurlInit() { curl_global_init(CURL_GLOBAL_DEFAULT); }
} curl_init;

size_t collect(char* p, size_t size, size_t n, void* out) {
  auto* v = static_cast<std::vector<std::byte>*>(out);
  auto* b = reinterpret_cast<const std::byte*>(p);
  v->insert(v->end(), b, b + size * n);
  return size * n;
}

size_t collect_header(char* p, size_t size, size_t n, void* out) {
  auto* h = static_cast<std::map<std::string, std::string>*>(out);
  std::string line(p, size * n);
  auto colon = line.find(':');
  if (colon != std::string::npos) {
    std::string name = line.substr(0, colon);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
    std::string value = line.substr(colon + 1);
    auto first = value.find_first_not_of(" \t");
    auto last = value.find_last_not_of(" \t\r\n");
    (*h)[name] = first == std::string::npos ? "" : value.substr(first, last - first + 1);
  } else if (line.rfind("HTTP/", 0) == 0) {
    h->clear();  // a new response (after 100 Continue or a redirect)
  }
  return size * n;
}

// A request body being sent: bytes in memory, or a file read straight
// into libcurl's buffer (no copy of the whole body in memory).
struct Upload {
  std::span<const std::byte> data;
  int fd = -1;
  uint64_t size = 0;
  uint64_t pos = 0;
  std::string error;  // why the file could not be read
};

size_t feed_file(char* p, size_t max, Upload* u) {
  size_t want = static_cast<size_t>(std::min<uint64_t>(max, u->size - u->pos));
  if (want == 0) return 0;
  auto r = io::read_all(u->fd, p, want, static_cast<int64_t>(u->pos));
  if (r.bytes < want) {  // the file is shorter than the Content-Length sent: never send less
    u->error = r.error ? std::strerror(r.error) : "the file is shorter than expected";
    return CURL_READFUNC_ABORT;
  }
  u->pos += r.bytes;
  return r.bytes;
}

size_t feed(char* p, size_t size, size_t n, void* in) {
  auto* u = static_cast<Upload*>(in);
  if (u->fd >= 0) return feed_file(p, size * n, u);
  size_t k = std::min<size_t>(size * n, u->data.size() - u->pos);
  std::memcpy(p, u->data.data() + u->pos, k);
  u->pos += k;
  return k;
}

// libcurl rewinds a body it must send again on the same request (a
// redirect, an authentication retry); without this it would fail.
int rewind_body(void* in, curl_off_t offset, int origin) {
  auto* u = static_cast<Upload*>(in);
  uint64_t size = u->fd >= 0 ? u->size : u->data.size();
  if (origin != SEEK_SET || offset < 0 || static_cast<uint64_t>(offset) > size) return CURL_SEEKFUNC_CANTSEEK;
  u->pos = static_cast<uint64_t>(offset);
  return CURL_SEEKFUNC_OK;
}

bool transient(long status) { return status == 429 || status >= 500; }

}  // namespace

std::string uri_encode(const std::string& s, bool keep_slash) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string Response::error_code() const {
  pugi::xml_document doc;
  if (!doc.load_buffer(body.data(), body.size())) return "";
  return doc.child("Error").child_value("Code");
}

// CBTFS_S3_DEBUG=1 shows the HTTP exchanges (signatures, not secrets);
// CBTFS_S3_STATS=1 counts the requests, printed when the process is done.
Client::Client(S3Config config)
    : config_(std::move(config)),
      debug_(std::getenv("CBTFS_S3_DEBUG") != nullptr),
      stats_(std::getenv("CBTFS_S3_STATS") != nullptr) {}

Client::~Client() {
  for (void* h : idle_) curl_easy_cleanup(static_cast<CURL*>(h));
  if (!stats_) return;
  std::string line;
  for (auto& [m, n] : by_method_) line += " " + m + " " + std::to_string(n);
  std::fprintf(stderr, "cbtfs: %llu S3 requests:%s\n", static_cast<unsigned long long>(requests_.load()), line.c_str());
}

std::string Client::describe() const {
  return "s3://" + config_.bucket + (config_.prefix.empty() ? "" : "/" + config_.prefix);
}

void* Client::take_handle() {
  {
    std::lock_guard g(mu_);
    if (!idle_.empty()) {
      void* h = idle_.back();
      idle_.pop_back();
      return h;
    }
  }
  CURL* c = curl_easy_init();
  if (!c) throw StorageError("cannot initialise libcurl", ENOMEM);
  return c;
}

void Client::give_handle(void* h) {
  std::lock_guard g(mu_);
  idle_.push_back(h);
}

Response Client::send(const Request& r) {
  // A retried conditional PUT may find its own first attempt and answer
  // 412: callers of those compare the stored bytes before calling it lost.
  // About 30 s of retries: long enough for a gateway restart, short enough
  // that a dead endpoint is reported while the admin is still looking.
  std::string why;
  for (int attempt = 0;; ++attempt) {
    why.clear();
    Response resp = send_once(r, why);
    bool again = !why.empty() || transient(resp.status);
    auto pause = std::chrono::milliseconds(std::min(100 << attempt, 8000));
    bool late = r.deadline && std::chrono::steady_clock::now() + pause >= *r.deadline;
    if (!again || attempt >= 8 || late) {
      if (late && !why.empty())
        throw StorageError("no answer from " + config_.endpoint + " for " + describe() + "/" + r.key +
                               " within its deadline: " + why,
                           ETIMEDOUT);
      if (!why.empty()) throw StorageError("cannot reach " + config_.endpoint + " for " + describe() + ": " + why, EIO);
      return resp;
    }
    std::this_thread::sleep_for(pause);
  }
}

namespace {
// What is left of a request's deadline, for libcurl: at least 1 ms (0
// would mean no limit).
long millis_left(const Request& r) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*r.deadline - std::chrono::steady_clock::now());
  return std::max<long>(1, static_cast<long>(left.count()));
}
}  // namespace

Response Client::send_once(const Request& r, std::string& transport_error) {
  ++requests_;
  if (stats_) {
    std::lock_guard g(mu_);
    ++by_method_[r.method];
  }
  CURL* c = static_cast<CURL*>(take_handle());
  struct Give {
    Client* self;
    CURL* c;
    ~Give() { self->give_handle(c); }
  } give{this, c};
  curl_easy_reset(c);

  std::string url = config_.endpoint + "/" + config_.bucket;
  if (!r.key.empty()) url += "/" + uri_encode(r.key, true);
  char sep = '?';
  for (auto& [k, v] : r.query) {
    url += sep + uri_encode(k, false) + "=" + uri_encode(v, false);
    sep = '&';
  }
  Response resp;
  char err[CURL_ERROR_SIZE] = {0};
  curl_slist* headers = curl_slist_append(nullptr, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
  for (auto& h : r.headers) headers = curl_slist_append(headers, h.c_str());
  std::string range;
  if (r.range_length) {
    range = std::to_string(r.range_first) + "-" + std::to_string(r.range_first + r.range_length - 1);
    curl_easy_setopt(c, CURLOPT_RANGE, range.c_str());
  }
  std::string sigv4 = "aws:amz:" + config_.region + ":s3";
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_AWS_SIGV4, sigv4.c_str());
  curl_easy_setopt(c, CURLOPT_USERNAME, config_.access_key.c_str());
  curl_easy_setopt(c, CURLOPT_PASSWORD, config_.secret_key.c_str());
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &resp.body);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, collect_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &resp.headers);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  // Not "Expect:" to drop 100-continue: libcurl would sign the empty header.
  curl_easy_setopt(c, CURLOPT_EXPECT_100_TIMEOUT_MS, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
  // A stalled transfer, not a slow one, is the failure to catch.
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1024L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  if (r.deadline) curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, millis_left(r));
  if (debug_) curl_easy_setopt(c, CURLOPT_VERBOSE, 1L);
  if (!config_.ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, config_.ca_file.c_str());
  if (config_.insecure) {
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  Upload up{r.body, r.body_fd, r.body_fd_size, 0, {}};
  if (r.method == "HEAD") {
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  } else if (r.method == "PUT") {
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, feed);
    curl_easy_setopt(c, CURLOPT_READDATA, &up);
    curl_easy_setopt(c, CURLOPT_SEEKFUNCTION, rewind_body);
    curl_easy_setopt(c, CURLOPT_SEEKDATA, &up);
    curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(r.body_size()));
  } else if (r.method == "POST") {
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, r.body.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(r.body.size()));
  } else if (r.method != "GET") {
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, r.method.c_str());
  }
  CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  if (rc != CURLE_OK) {
    transport_error = err[0] ? err : curl_easy_strerror(rc);
    if (!up.error.empty()) transport_error += " (cannot read the body: " + up.error + ")";
    if (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE)
      transport_error += " (the endpoint's certificate is not trusted: set CBTFS_S3_CA_FILE)";
    return resp;
  }
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &resp.status);
  return resp;
}

}  // namespace cbtfs::s3
