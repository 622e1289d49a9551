// XAPI client. The password lives only in memory; it is never logged and
// never part of an error message (login failures name the user only).
#include "client.hpp"

#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <thread>

#include "curl_options.hpp"

namespace cbtfs::xapi {

namespace {

// Calls that only read can be repeated safely after a lost or garbled
// answer; a snapshot or a destroy cannot (it may have happened).
bool read_only(const std::string& method) {
  auto op = method.substr(method.find('.') + 1);
  return op.rfind("get_", 0) == 0 || op == "list_changed_blocks";
}

// What an admin should do about the errors a backup run meets.
std::string explain(const std::string& method, const std::vector<std::string>& d) {
  static const std::map<std::string, std::string> hints = {
      {"SESSION_AUTHENTICATION_FAILED", "wrong user name or password"},
      {"HOST_IS_SLAVE", "this host is a pool member; connect to the pool master"},
      {"SESSION_INVALID", "the session expired or was logged out"},
      {"HANDLE_INVALID", "the object no longer exists"},
      {"UUID_INVALID", "no object with that uuid"},
      {"MESSAGE_METHOD_UNKNOWN", "the host does not know this call (too old for changed block tracking?)"},
      {"VDI_NO_CBT_METADATA", "the snapshot has no changed-block-tracking metadata"},
      {"VDI_IN_USE", "the disk is attached somewhere else right now"},
      {"VDI_INCOMPATIBLE_TYPE", "the disk is of a type that cannot be used here"},
      {"SR_OPERATION_NOT_SUPPORTED", "its storage repository does not support changed block tracking"},
      {"LICENCE_RESTRICTION", "changed block tracking needs a licence this host lacks"},
      {"OPERATION_NOT_ALLOWED", "the host refused the operation"},
      {"OTHER_OPERATION_IN_PROGRESS", "another operation on this object is running"},
      {"VDI_CBT_ENABLED", "changed block tracking is enabled on the disk"},
  };
  std::string code = d.empty() ? "UNKNOWN" : d[0];
  std::string msg = method + " failed: " + code;
  if (d.size() > 1) {
    msg += " [";
    for (size_t i = 1; i < d.size(); ++i) msg += (i > 1 ? ", " : "") + d[i];
    msg += "]";
  }
  auto it = hints.find(code);
  if (it != hints.end()) msg += ": " + it->second;
  else if (code.rfind("SR_BACKEND_FAILURE", 0) == 0) msg += ": the storage backend failed";
  return msg;
}

size_t collect(char* data, size_t size, size_t n, void* user) {
  auto* out = static_cast<std::string*>(user);
  if (out->size() + size * n > (256u << 20)) return 0;  // no sane XAPI answer is this large
  out->append(data, size * n);
  return size * n;
}

// The request body, given to libcurl piece by piece rather than as
// CURLOPT_POSTFIELDS, so that libcurl must ask before sending it again.
// It does that on its own when a kept-alive connection closes before any
// answer came, but the host may have carried the call out by then: a call
// that changes something (a snapshot, a destroy) refuses, and so fails as
// a call whose answer was lost, which its caller knows how to settle.
// A call that only reads is sent again.
struct RequestBody {
  const std::string& text;
  size_t sent;
  bool may_resend;
};

size_t read_body(char* buf, size_t size, size_t n, void* user) {
  auto* b = static_cast<RequestBody*>(user);
  size_t len = std::min(size * n, b->text.size() - b->sent);
  std::memcpy(buf, b->text.data() + b->sent, len);
  b->sent += len;
  return len;
}

int rewind_body(void* user, curl_off_t offset, int origin) {
  auto* b = static_cast<RequestBody*>(user);
  if (!b->may_resend || origin != SEEK_SET || offset != 0) return CURL_SEEKFUNC_FAIL;
  b->sent = 0;
  return CURL_SEEKFUNC_OK;
}

struct CurlInit {
  CurlInit() { curl_global_init(CURL_GLOBAL_DEFAULT); }
};

}  // namespace

XapiError::XapiError(std::string method, std::vector<std::string> description)
    : std::runtime_error(explain(method, description)), method_(std::move(method)), description_(std::move(description)) {
  if (description_.empty()) description_.push_back("UNKNOWN");
}

Client::Client(ClientOptions opts) : opts_(std::move(opts)) {
  static CurlInit init;
  curl_ = curl_easy_init();
  if (!curl_) throw TransportError("cannot initialise libcurl");
}

Client::~Client() {
  logout();
  curl_easy_cleanup(static_cast<CURL*>(curl_));
}

std::string Client::post(const std::string& body, bool may_resend) {
  CURL* c = static_cast<CURL*>(curl_);
  curl_easy_reset(c);  // keeps the connection: calls after the first skip the TCP and TLS handshakes
  std::string response;
  char err[CURL_ERROR_SIZE] = "";
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: text/xml");
  headers = curl_slist_append(headers, "Expect:");  // no 100-continue round trip
  RequestBody out{body, 0, may_resend};
  curl_easy_setopt(c, CURLOPT_URL, opts_.url.c_str());
  curl_easy_setopt(c, CURLOPT_POST, 1L);
  curl_easy_setopt(c, CURLOPT_READFUNCTION, read_body);
  curl_easy_setopt(c, CURLOPT_READDATA, &out);
  curl_easy_setopt(c, CURLOPT_SEEKFUNCTION, rewind_body);
  curl_easy_setopt(c, CURLOPT_SEEKDATA, &out);
  curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &response);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 30L);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, opts_.timeout_seconds);
  // A connection idle for longer is not used again: the host may be about
  // to close it, and a call that changes something could then not be sent.
  curl_easy_setopt(c, CURLOPT_MAXAGE_CONN, 30L);
  apply_connection_options(c, opts_);
  CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  if (rc != CURLE_OK) {
    std::string why = err[0] ? err : curl_easy_strerror(rc);
    if (rc == CURLE_SEND_FAIL_REWIND)  // see RequestBody
      why = "the connection closed before the host answered (the call may have been carried out)";
    if (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE || rc == CURLE_SSL_CERTPROBLEM)
      why += " (the host's certificate is not trusted: give its CA with --ca-file, or --insecure to skip the check)";
    throw TransportError("cannot reach XAPI at " + opts_.url + ": " + why);
  }
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  if (status != 200)
    throw TransportError("XAPI at " + opts_.url + " answered HTTP " + std::to_string(status));
  return response;
}

Value Client::raw_call(const std::string& method, const std::vector<Value>& params) {
  ++calls_;
  Value env = decode_response(post(encode_call(method, params), read_only(method)));
  const std::string& status = env.at("Status").str();
  if (status == "Success") return env.has("Value") ? env.at("Value") : Value();
  if (status != "Failure") throw ProtocolError("XAPI answered status '" + status + "' to " + method);
  std::vector<std::string> desc;
  if (env.has("ErrorDescription"))
    for (auto& v : env.at("ErrorDescription").array()) desc.push_back(v.type() == Value::Type::Scalar ? v.str() : "?");
  throw XapiError(method, desc);
}

namespace {
// url with its host replaced (scheme, port and path kept), via libcurl's URL
// parser so that IPv6 literals and odd ports come out right.
std::string with_host(const std::string& url, std::string host) {
  if (host.find(':') != std::string::npos && host.front() != '[') host = "[" + host + "]";
  CURLU* u = curl_url();
  if (!u) throw TransportError("out of memory");
  char* out = nullptr;
  bool ok = curl_url_set(u, CURLUPART_URL, url.c_str(), 0) == CURLUE_OK &&
            curl_url_set(u, CURLUPART_HOST, host.c_str(), 0) == CURLUE_OK &&
            curl_url_get(u, CURLUPART_URL, &out, 0) == CURLUE_OK;
  std::string result = ok ? out : "";
  curl_free(out);
  curl_url_cleanup(u);
  if (!ok) throw TransportError("cannot make a URL for the pool master '" + host + "' from " + url);
  return result;
}
}  // namespace

void Client::login() {
  std::lock_guard g(mu_);
  try {
    session_ = raw_call("session.login_with_password",
                        {Value(opts_.user), Value(opts_.password), Value("1.0"), Value("cbtfs")})
                   .str();
  } catch (const XapiError& e) {
    // A pool member names its master; XAPI only accepts logins there.
    if (e.code() != "HOST_IS_SLAVE" || e.param(0).empty()) throw;
    redirected_from_ = opts_.url;
    opts_.url = with_host(opts_.url, e.param(0));
    session_ = raw_call("session.login_with_password",
                        {Value(opts_.user), Value(opts_.password), Value("1.0"), Value("cbtfs")})
                   .str();
  }
}

void Client::logout() noexcept {
  std::lock_guard g(mu_);
  if (session_.empty()) return;
  try {
    raw_call("session.logout", {Value(session_)});
  } catch (const std::exception&) {
    // Best effort: an expired session is gone anyway.
  }
  session_.clear();
}


Value Client::call(const std::string& method, std::vector<Value> args) {
  std::lock_guard g(mu_);
  bool relogged = false;
  for (int attempt = 0;; ++attempt) {
    std::vector<Value> params;
    params.reserve(args.size() + 1);
    params.emplace_back(session_);
    params.insert(params.end(), args.begin(), args.end());
    try {
      return raw_call(method, params);
    } catch (const XapiError& e) {
      if (e.code() != "SESSION_INVALID" || relogged) throw;
      relogged = true;
      session_ = raw_call("session.login_with_password",
                          {Value(opts_.user), Value(opts_.password), Value("1.0"), Value("cbtfs")})
                     .str();
    } catch (const std::runtime_error& e) {  // TransportError, ProtocolError
      if (!read_only(method) || attempt >= opts_.retries) throw;
      std::this_thread::sleep_for(std::chrono::seconds(1 << std::min(attempt, 4)));
    }
  }
}

}  // namespace cbtfs::xapi
