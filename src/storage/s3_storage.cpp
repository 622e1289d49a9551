// S3 implementation of the Storage interface.
// An object store has no rename and no flock, so the three promises of
// storage.hpp are kept this way:
//   - invisible until committed: small objects are one PUT, large ones a
//     multipart upload, and S3 shows neither before it completes;
//   - never overwritten: PUT with If-None-Match: * (one winner), and a
//     multipart commit checks first (its writer holds the VDI lock);
//   - one lock holder: a lock object created with If-None-Match: * and kept
//     alive by a heartbeat (If-Match on its ETag); a holder that died stops
//     beating, and after a lease (90 s) of the gateway's own clock its lock
//     may be taken over, again with If-Match so only one taker wins.
#include "cbtfs/s3_storage.hpp"

#include <curl/curl.h>
#include <sys/prctl.h>
#include <pugixml.hpp>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <future>
#include <random>
#include <set>
#include <thread>

#include "cbtfs/errors.hpp"
#include "s3_client.hpp"
#include "s3_reader_leases.hpp"

namespace cbtfs {
namespace {

using s3::Request;
using s3::Response;

constexpr size_t kPartSize = 16 << 20;   // multipart above this; parts of this size
constexpr size_t kPartsInFlight = 4;     // 64 MiB of a pack in memory at most

// A lock not refreshed for this long belongs to a dead writer. 90 s by
// default; CBTFS_S3_LEASE_SECONDS changes it (all writers must agree).
int lease_seconds() {
  static const int s = [] {
    const char* v = std::getenv("CBTFS_S3_LEASE_SECONDS");
    int n = v ? std::atoi(v) : 0;
    return n >= 2 ? n : 90;
  }();
  return s;
}

std::span<const std::byte> bytes_of(const std::string& s) { return std::as_bytes(std::span(s)); }

std::string random_token() {
  std::random_device rd;
  char buf[40];
  std::snprintf(buf, sizeof buf, "token %08x%08x%08x%08x", rd(), rd(), rd(), rd());
  return buf;
}

std::string strip_quotes(std::string etag) {
  if (etag.size() >= 2 && etag.front() == '"' && etag.back() == '"') etag = etag.substr(1, etag.size() - 2);
  return etag;
}

Response conflict() {
  Response r;
  r.status = 412;
  return r;
}

[[noreturn]] void fail(const s3::Client& c, const std::string& what, const std::string& key, const Response& r) {
  std::string code = r.error_code();
  std::string where = c.describe() + "/" + key;
  std::string msg = what + " " + where + ": HTTP " + std::to_string(r.status) + (code.empty() ? "" : " " + code);
  int err = EIO;
  if (r.status == 403) {
    err = EACCES;
    msg += " (check the access key, the secret key and the region)";
  } else if (r.status == 404 && code == "NoSuchBucket") {
    err = ENOENT;
    msg += " (the bucket does not exist)";
  } else if (r.status == 404) {
    err = ENOENT;
  } else if (code == "QuotaExceeded" || r.status == 507) {
    err = ENOSPC;
  } else if (r.status == 412) {
    err = EEXIST;
  }
  throw StorageError(msg, err);
}

// A pack can be gigabytes: it streams out in parts while it is written.
class S3Writer final : public ObjectWriter {
 public:
  S3Writer(s3::Client& c, std::string key) : c_(c), key_(std::move(key)) {}
  ~S3Writer() override {
    if (committed_ || upload_id_.empty()) return;
    for (auto& f : inflight_) f.wait();
    Request r = Request("DELETE", key_).param("uploadId", upload_id_);
    try {
      c_.send(r);  // best effort: remove_temporaries() aborts what is left
    } catch (const std::exception&) {
    }
  }
  void append(std::span<const std::byte> data) override {
    buf_.insert(buf_.end(), data.begin(), data.end());
    size_ += data.size();
    if (buf_.size() >= kPartSize) send_part();
  }
  uint64_t size() const override { return size_; }

  void commit() override {
    if (upload_id_.empty()) {
      Request r = Request("PUT", key_).header("If-None-Match: *").with_body(buf_);
      Response resp = c_.send(r);
      if (resp.status == 412 && stored_equals(buf_)) resp.status = 200;  // our own retried PUT
      if (resp.status != 200) fail(c_, resp.status == 412 ? "refusing to overwrite" : "cannot write", key_, resp);
      committed_ = true;
      return;
    }
    if (!buf_.empty()) send_part();
    // Completing an upload overwrites whatever is there: look first.
    if (c_.send(Request("HEAD", key_)).status == 200) fail(c_, "refusing to overwrite", key_, conflict());
    std::string xml = "<CompleteMultipartUpload>";
    for (size_t i = 0; i < inflight_.size(); ++i)
      xml += "<Part><PartNumber>" + std::to_string(i + 1) + "</PartNumber><ETag>" + inflight_[i].get() +
             "</ETag></Part>";
    xml += "</CompleteMultipartUpload>";
    Request r = Request("POST", key_).param("uploadId", upload_id_).with_body(bytes_of(xml));
    Response resp = c_.send(r);
    // S3 may answer 200 with an error document when completion fails late.
    if (resp.status != 200 || resp.text().find("<Error>") != std::string::npos)
      fail(c_, "cannot complete the upload of", key_, resp);
    committed_ = true;
  }

 private:
  bool stored_equals(const Bytes& want) {
    Response r = c_.send(Request("GET", key_));
    return r.status == 200 && r.body == want;
  }

  void start_upload() {
    Response head = c_.send(Request("HEAD", key_));
    if (head.status == 200) fail(c_, "refusing to overwrite", key_, conflict());
    Response resp = c_.send(Request("POST", key_).param("uploads", ""));
    if (resp.status != 200) fail(c_, "cannot start the upload of", key_, resp);
    pugi::xml_document doc;
    doc.load_buffer(resp.body.data(), resp.body.size());
    upload_id_ = doc.child("InitiateMultipartUploadResult").child_value("UploadId");
    if (upload_id_.empty()) fail(c_, "no upload id for", key_, resp);
  }

  void send_part() {
    if (upload_id_.empty()) start_upload();
    // A full window waits for its oldest part, which bounds memory.
    auto busy = [&] {
      return std::count_if(inflight_.begin(), inflight_.end(), [](auto& f) {
        return f.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
      });
    };
    for (auto& f : inflight_) {
      if (static_cast<size_t>(busy()) < kPartsInFlight) break;
      f.wait();
    }
    auto part = std::make_shared<Bytes>(std::move(buf_));
    buf_ = Bytes();
    buf_.reserve(kPartSize + (1 << 20));
    int number = static_cast<int>(inflight_.size()) + 1;
    inflight_.push_back(std::async(std::launch::async, [this, part, number] {
      Request r = Request("PUT", key_).param("partNumber", std::to_string(number)).param("uploadId", upload_id_).with_body(*part);
      Response resp = c_.send(r);
      if (resp.status != 200) fail(c_, "cannot upload part " + std::to_string(number) + " of", key_, resp);
      return resp.header("etag");
    }).share());
  }

  s3::Client& c_;
  std::string key_;
  std::string upload_id_;
  Bytes buf_;
  uint64_t size_ = 0;
  std::vector<std::shared_future<std::string>> inflight_;
  bool committed_ = false;
};

class S3Lock final : public StorageLock {
 public:
  S3Lock(s3::Client& c, std::string key, std::string body, std::string etag)
      : c_(c), key_(std::move(key)), body_(std::move(body)), etag_(std::move(etag)) {
    beat_ = std::thread([this] { heartbeat(); });
  }
  ~S3Lock() override {
    {
      std::lock_guard g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    beat_.join();
    if (lost_) return;
    try {
      c_.send(Request("DELETE", key_));
    } catch (const std::exception&) {
      // The lease runs out by itself.
    }
  }
  // Called before a commit: a lock just rewritten cannot be taken over for
  // a whole lease, however late the heartbeat thread runs.
  void check() override {
    if (!refresh())
      throw LockedError("the lock " + c_.describe() + "/" + key_ +
                        " was taken over by another writer (this process stalled longer than the " +
                        std::to_string(lease_seconds()) + " s lease)");
  }

 private:
  // Rewrites the lock object; false when another writer holds it now.
  bool refresh() {
    std::lock_guard serial(refresh_mu_);
    std::string etag;
    {
      std::lock_guard g(mu_);
      if (lost_) return false;
      etag = etag_;
    }
    Response r = c_.send(Request("PUT", key_).header("If-Match: " + etag).with_body(bytes_of(body_)));
    std::string fresh;
    if (r.status == 200) {
      fresh = strip_quotes(r.header("etag"));
    } else if (r.status == 412 || r.status == 404) {
      // An earlier rewrite of ours may have landed unseen (its answer was
      // lost and retried): the body, unique to this holder, tells.
      Response cur = c_.send(Request("GET", key_));
      if (cur.status != 200 || cur.text() != body_) {
        std::lock_guard g(mu_);
        lost_ = true;
        return false;
      }
      fresh = strip_quotes(cur.header("etag"));
    } else {
      fail(c_, "cannot refresh the lock", key_, r);
    }
    std::lock_guard g(mu_);
    etag_ = fresh;
    return true;
  }

  void heartbeat() {
    std::unique_lock g(mu_);
    while (!cv_.wait_for(g, std::chrono::milliseconds(lease_seconds() * 1000 / 4), [this] { return stop_; })) {
      g.unlock();
      bool held = true;
      try {
        held = refresh();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "cbtfs: cannot refresh the lock %s: %s\n", key_.c_str(), e.what());
      }
      if (!held) {
        std::fprintf(stderr, "cbtfs: lost the lock %s/%s to another writer\n", c_.describe().c_str(), key_.c_str());
        return;
      }
      g.lock();
    }
  }

  s3::Client& c_;
  std::string key_, body_, etag_;
  std::mutex refresh_mu_;  // one rewrite at a time: each needs the last ETag
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, lost_ = false;
  std::thread beat_;
};

class S3Storage final : public Storage {
 public:
  explicit S3Storage(const S3Config& config) : c_(config) {
    // The bucket must exist: say so now rather than at the first write.
    Response r = c_.send(Request("GET", "").param("list-type", "2").param("max-keys", "1"));
    if (r.status != 200) fail(c_, "cannot open", "", r);
  }

  void read(const std::string& key, uint64_t offset, std::span<std::byte> out) override {
    if (out.empty()) return;
    Response r = c_.send(Request("GET", full(key)).range(offset, out.size()));
    if (r.status == 416 || ((r.status == 206 || r.status == 200) && r.body.size() < out.size()))
      throw FormatError("short read from " + c_.describe() + "/" + key + " at offset " + std::to_string(offset) +
                        ": the object is truncated");
    if (r.status == 200 && offset == 0 && r.body.size() >= out.size()) {
      // a server that ignores Range: the first bytes are still right
    } else if (r.status != 206) {
      fail(c_, "cannot read", full(key), r);
    }
    std::copy_n(r.body.begin(), out.size(), out.begin());
  }

  std::optional<Bytes> get(const std::string& key) override {
    Response r = c_.send(Request("GET", full(key)));
    if (r.status == 404) return std::nullopt;
    if (r.status != 200) fail(c_, "cannot read", full(key), r);
    return std::move(r.body);
  }

  std::optional<uint64_t> size(const std::string& key) override {
    Response r = c_.send(Request("HEAD", full(key)));
    if (r.status == 404) return std::nullopt;
    if (r.status != 200) fail(c_, "cannot stat", full(key), r);
    return std::stoull(r.header("content-length"));
  }

  std::vector<std::string> list(const std::string& prefix) override {
    std::string p = full(prefix);
    if (!p.empty()) p += "/";
    std::set<std::string> names;
    std::string token;
    do {
      Request req = Request("GET", "").param("list-type", "2").param("prefix", p).param("delimiter", "/");
      if (!token.empty()) req.param("continuation-token", token);
      Response r = c_.send(req);
      if (r.status != 200) fail(c_, "cannot list", p, r);
      pugi::xml_document doc;
      if (!doc.load_buffer(r.body.data(), r.body.size())) fail(c_, "unreadable listing of", p, r);
      auto result = doc.child("ListBucketResult");
      for (auto n : result.children("Contents")) names.insert(std::string(n.child_value("Key")).substr(p.size()));
      for (auto n : result.children("CommonPrefixes")) {
        std::string d = std::string(n.child_value("Prefix")).substr(p.size());
        if (!d.empty() && d.back() == '/') d.pop_back();
        names.insert(d);
      }
      token = std::string(result.child_value("IsTruncated")) == "true" ? result.child_value("NextContinuationToken") : "";
    } while (!token.empty());
    names.erase("");
    return {names.begin(), names.end()};
  }

  std::unique_ptr<ObjectWriter> create(const std::string& key) override {
    return std::make_unique<S3Writer>(c_, full(key));
  }

  void remove(const std::string& key) override {
    Response r = c_.send(Request("DELETE", full(key)));
    if (r.status != 204 && r.status != 200 && r.status != 404) fail(c_, "cannot remove", full(key), r);
  }

  // What a dead writer leaves on S3 is an incomplete multipart upload.
  void remove_temporaries(const std::string& prefix) override {
    std::string p = full(prefix) + "/";
    Response r = c_.send(Request("GET", "").param("prefix", p).param("uploads", ""));
    if (r.status != 200) fail(c_, "cannot list the uploads under", p, r);
    pugi::xml_document doc;
    doc.load_buffer(r.body.data(), r.body.size());
    for (auto u : doc.child("ListMultipartUploadsResult").children("Upload")) {
      Response a = c_.send(Request("DELETE", u.child_value("Key")).param("uploadId", u.child_value("UploadId")));
      if (a.status != 204 && a.status != 200 && a.status != 404) fail(c_, "cannot abort the upload of", u.child_value("Key"), a);
    }
  }

  std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) override {
    std::string k = full(key);
    std::string body = holder + "\n" + random_token() + "\n";
    Response r = c_.send(Request("PUT", k).header("If-None-Match: *").with_body(bytes_of(body)));
    if (r.status == 200) return std::make_unique<S3Lock>(c_, k, body, strip_quotes(r.header("etag")));
    if (r.status != 412) fail(c_, "cannot lock", k, r);
    // Held, or left by a holder that died: the gateway's clock decides.
    Response cur = c_.send(Request("GET", k));
    if (cur.status == 404) return nullptr;  // just released: the caller may try again
    if (cur.status != 200) fail(c_, "cannot read the lock", k, cur);
    if (cur.text() == body)  // our own first PUT landed, and its retry saw it
      return std::make_unique<S3Lock>(c_, k, body, strip_quotes(cur.header("etag")));
    time_t modified = curl_getdate(cur.header("last-modified").c_str(), nullptr);
    time_t now = curl_getdate(cur.header("date").c_str(), nullptr);
    if (modified < 0 || now < 0 || now - modified < lease_seconds()) return nullptr;
    std::string etag = strip_quotes(cur.header("etag"));
    Response take = c_.send(Request("PUT", k).header("If-Match: " + etag).with_body(bytes_of(body)));
    if (take.status != 200) return nullptr;
    std::fprintf(stderr, "cbtfs: took over the lock %s/%s, abandoned %ld s ago by %s", c_.describe().c_str(),
                 k.c_str(), static_cast<long>(now - modified), cur.text().substr(0, cur.text().find('\n') + 1).c_str());
    return std::make_unique<S3Lock>(c_, k, body, strip_quotes(take.header("etag")));
  }

  // Readers of a point announce themselves with lease objects (no flock on S3).
  std::unique_ptr<Claim> claim_shared(const std::string& key) override { return leases_.shared(full("claims/" + key)); }
  std::unique_ptr<Claim> claim_exclusive(const std::string& key) override {
    return leases_.exclusive(full("claims/" + key));
  }

  std::string describe() const override { return c_.describe(); }

 private:
  std::string full(const std::string& key) const {
    const std::string& root = c_.config().prefix;
    if (root.empty()) return key;
    return key.empty() ? root : root + "/" + key;
  }

  s3::Client c_;
  s3::ReaderLeases leases_{c_, lease_seconds()};
};

void apply(S3Config& c, const std::string& name, const std::string& value) {
  if (value.empty()) return;
  if (name == "endpoint") c.endpoint = value;
  else if (name == "region") c.region = value;
  else if (name == "access_key") c.access_key = value;
  else if (name == "secret_key") c.secret_key = value;
  else if (name == "ca_file") c.ca_file = value;
  else if (name == "insecure") c.insecure = value == "1" || value == "true" || value == "yes";
  else throw UsageError("unknown S3 setting '" + name + "'");
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

bool is_s3_url(const std::string& url) { return url.rfind("s3://", 0) == 0; }

S3Config s3_config_from_url(const std::string& url) {
  S3Config c;
  std::string rest = url.substr(5);
  std::string query;
  if (auto q = rest.find('?'); q != std::string::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  auto slash = rest.find('/');
  c.bucket = rest.substr(0, slash);
  c.prefix = slash == std::string::npos ? "" : rest.substr(slash + 1);
  while (!c.prefix.empty() && c.prefix.back() == '/') c.prefix.pop_back();
  if (c.bucket.empty()) throw UsageError(url + ": no bucket (s3://BUCKET/PREFIX)");

  // Lowest precedence first: the file, then the environment, then the URL.
  if (std::string file = env("CBTFS_S3_CONFIG"); !file.empty()) {
    std::ifstream in(file);
    if (!in) throw UsageError("cannot read " + file + " (CBTFS_S3_CONFIG)");
    for (std::string line; std::getline(in, line);) {
      auto first = line.find_first_not_of(" \t");
      if (first == std::string::npos || line[first] == '#') continue;
      auto eq = line.find('=');
      if (eq == std::string::npos) throw UsageError(file + ": expected name = value, got '" + line + "'");
      auto trim = [](std::string s) {
        s.erase(0, s.find_first_not_of(" \t"));
        s.erase(s.find_last_not_of(" \t\r") + 1);
        return s;
      };
      apply(c, trim(line.substr(0, eq)), trim(line.substr(eq + 1)));
    }
  }
  apply(c, "endpoint", env("CBTFS_S3_ENDPOINT"));
  apply(c, "endpoint", env("AWS_ENDPOINT_URL"));
  apply(c, "region", env("AWS_DEFAULT_REGION"));
  apply(c, "region", env("AWS_REGION"));
  apply(c, "access_key", env("AWS_ACCESS_KEY_ID"));
  apply(c, "secret_key", env("AWS_SECRET_ACCESS_KEY"));
  apply(c, "ca_file", env("CBTFS_S3_CA_FILE"));
  for (size_t pos = 0; pos < query.size();) {
    auto amp = query.find('&', pos);
    std::string kv = query.substr(pos, amp == std::string::npos ? std::string::npos : amp - pos);
    pos = amp == std::string::npos ? query.size() : amp + 1;
    auto eq = kv.find('=');
    std::string name = kv.substr(0, eq);
    if (name == "access_key" || name == "secret_key")
      throw UsageError("credentials do not belong in the repository URL; use AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY or a CBTFS_S3_CONFIG file");
    apply(c, name, eq == std::string::npos ? "" : kv.substr(eq + 1));
  }
  if (c.endpoint.empty()) c.endpoint = "https://s3." + c.region + ".amazonaws.com";
  while (!c.endpoint.empty() && c.endpoint.back() == '/') c.endpoint.pop_back();
  if (c.access_key.empty() || c.secret_key.empty())
    throw UsageError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a file with "
                     "access_key = ... and secret_key = ... in CBTFS_S3_CONFIG");
  return c;
}

std::unique_ptr<Storage> open_s3_storage(const S3Config& config) {
  // The secret key is in this process from now on: no core dump may carry
  // it (as ssh-agent does for its keys).
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  return std::make_unique<S3Storage>(config);
}

}  // namespace cbtfs
