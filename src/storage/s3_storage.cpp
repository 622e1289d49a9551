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
//     may be taken over, again with If-Match so only one taker wins. It is
//     released by a conditional rewrite, never a DELETE (kReleased), and a
//     holder that could not rewrite it counts it as lost;
//   - fencing: what a holder commits or removes under its lock must be done
//     before its lease could run out (request deadlines), so a holder that
//     stalled past it cannot commit over the next holder's work.
#include "cbtfs/s3_storage.hpp"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <pugixml.hpp>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "cbtfs/errors.hpp"
#include "cbtfs/full_io.hpp"
#include "s3_client.hpp"
#include "s3_reader_leases.hpp"

namespace cbtfs {
namespace {

using s3::Request;
using s3::Response;

constexpr size_t kPartSize = 16 << 20;        // multipart above this; the first parts, in memory
constexpr size_t kMaxParts = 10000;           // S3's limit
constexpr uint64_t kLargestPart = 4ull << 30;  // S3 allows 5 GiB; parts overshoot by a record
constexpr size_t kPartsInFlight = 4;          // parts being sent while the next one fills

// Test knobs, not settings: CBTFS_S3_PART_SIZE and CBTFS_S3_MAX_PARTS let
// a test make parts grow, and reach the part limit, with a pack of a few
// hundred MiB instead of terabytes.
size_t env_number(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  long long n = v ? std::atoll(v) : 0;
  return n > 0 ? static_cast<size_t>(n) : fallback;
}
size_t base_part_size() {
  static const size_t s = env_number("CBTFS_S3_PART_SIZE", kPartSize);
  return s;
}
size_t max_parts() {
  static const size_t n = env_number("CBTFS_S3_MAX_PARTS", kMaxParts);
  return n;
}

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

// The body a released lock holds. Ceph RGW 16.2 ignores If-Match on DELETE
// (a DELETE with a wrong ETag removes the object), so a holder cannot
// delete its lock without risking the next holder's: it overwrites it with
// this, If-Match on its own ETag, and the next writer takes a released
// lock at once. The first line is empty: lock_holder() says "nobody".
const std::string kReleased = "\nreleased\n";

// How long a lock rewritten at time t is surely ours, on our own clock: the
// gateway's clock starts the lease when it stores the rewrite (after we
// sent it), and a taker reads the age in whole seconds (HTTP dates), so up
// to 1 s early; a twentieth of the lease covers clocks that run at
// slightly different rates.
std::chrono::steady_clock::duration safe_lease() {
  return std::chrono::milliseconds(lease_seconds() * 1000 - 1000 - lease_seconds() * 50);
}

class S3Lock;

// The locks this process holds, by the prefix they guard ("p/vdis/UUID/"),
// so that what a writer commits under a prefix is fenced by its lease.
class LockRegistry {
 public:
  void add(const std::string& prefix, S3Lock* l) {
    std::lock_guard g(mu_);
    locks_[prefix] = l;
  }
  void remove(const std::string& prefix) {
    std::lock_guard g(mu_);
    locks_.erase(prefix);
  }
  // The deadline before which a write of key must be over: nullopt when no
  // lock of ours guards it. Throws LockedError when the lease is lost.
  std::optional<std::chrono::steady_clock::time_point> fence(const std::string& key);

 private:
  std::mutex mu_;
  std::map<std::string, S3Lock*> locks_;
};

class S3Lock final : public StorageLock {
 public:
  S3Lock(s3::Client& c, LockRegistry& reg, std::string key, std::string body, std::string etag,
         std::chrono::steady_clock::time_point written)
      : c_(c), reg_(reg), key_(std::move(key)), body_(std::move(body)), etag_(std::move(etag)),
        valid_until_(written + safe_lease()) {
    reg_.add(guarded_prefix(), this);
    beat_ = std::thread([this] { heartbeat(); });
  }
  ~S3Lock() override {
    reg_.remove(guarded_prefix());
    {
      std::lock_guard g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    beat_.join();
    release();
  }
  // Called before a commit or a removal: at least three quarters of a
  // lease is left after it, however late the heartbeat thread runs. Not a
  // rewrite each time: a collection checks before each of thousands of
  // removals, and a rewrite per removal made it take minutes.
  void check() override {
    bool lost;
    {
      std::lock_guard g(mu_);
      lost = lost_;
    }
    if (lost) throw lost_error();  // the heartbeat found it taken over
    deadline(safe_lease() * 3 / 4);
  }
  // The end of the lease as this process can trust it, refreshed first when
  // less than `need` of it is left; throws LockedError when it is lost.
  std::chrono::steady_clock::time_point deadline(std::chrono::steady_clock::duration need) {
    auto until = valid_until();
    if (until - std::chrono::steady_clock::now() < need && !refresh()) throw lost_error();
    until = valid_until();
    if (until <= std::chrono::steady_clock::now()) throw lost_error();
    return until;
  }

 private:
  std::string guarded_prefix() const { return key_.substr(0, key_.rfind('/') + 1); }

  LockedError lost_error() const {
    return LockedError("lost the lock " + c_.describe() + "/" + key_ + " (" + why_lost_ +
                       "); another writer may hold it now, so nothing more is committed");
  }

  std::chrono::steady_clock::time_point valid_until() {
    std::lock_guard g(mu_);
    return valid_until_;
  }

  void lose(const std::string& why) {
    std::lock_guard g(mu_);
    if (!lost_) why_lost_ = why;
    lost_ = true;
  }

  // Rewrites the lock object; false when the lock is lost. A rewrite that
  // failed for any reason counts as lost: after it, nothing says how long
  // the lease still runs, and another writer may take it over.
  bool refresh() {
    std::lock_guard serial(refresh_mu_);
    std::string etag;
    {
      std::lock_guard g(mu_);
      if (lost_) return false;
      etag = etag_;
    }
    auto sent = std::chrono::steady_clock::now();
    std::string fresh;
    try {
      Request req = Request("PUT", key_).header("If-Match: " + etag).with_body(bytes_of(body_));
      Response r = c_.send(req.until(sent + safe_lease()));
      if (r.status == 200) {
        fresh = strip_quotes(r.header("etag"));
      } else if (r.status == 412 || r.status == 404) {
        // An earlier rewrite of ours may have landed unseen (its answer was
        // lost and retried): the body, unique to this holder, tells.
        Response cur = c_.send(Request("GET", key_));
        if (cur.status != 200 || cur.text() != body_) {
          lose("it was taken over: this process stalled for longer than the " + std::to_string(lease_seconds()) +
               " s lease");
          return false;
        }
        fresh = strip_quotes(cur.header("etag"));
      } else {
        lose("cannot rewrite it: HTTP " + std::to_string(r.status) + " " + r.error_code());
        return false;
      }
    } catch (const std::exception& e) {
      lose(std::string("cannot rewrite it: ") + e.what());
      return false;
    }
    std::lock_guard g(mu_);
    etag_ = fresh;
    valid_until_ = sent + safe_lease();
    return true;
  }

  void heartbeat() {
    std::unique_lock g(mu_);
    while (!cv_.wait_for(g, std::chrono::milliseconds(lease_seconds() * 1000 / 4), [this] { return stop_; })) {
      g.unlock();
      if (!refresh()) {
        std::fprintf(stderr, "cbtfs: lost the lock %s/%s: %s\n", c_.describe().c_str(), key_.c_str(),
                     why_lost_.c_str());
        return;
      }
      g.lock();
    }
  }

  // Conditional, so a lock another writer holds now stays his. Best effort:
  // a lock not released runs out by itself.
  void release() {
    std::string etag;
    {
      std::lock_guard g(mu_);
      etag = etag_;
    }
    try {
      c_.send(Request("PUT", key_).header("If-Match: " + etag).with_body(bytes_of(kReleased)));
    } catch (const std::exception&) {
    }
  }

  s3::Client& c_;
  LockRegistry& reg_;
  std::string key_, body_, etag_;
  std::chrono::steady_clock::time_point valid_until_;
  std::string why_lost_;
  std::mutex refresh_mu_;  // one rewrite at a time: each needs the last ETag
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, lost_ = false;
  std::thread beat_;
};

// A commit needs this much of the lease left, or the lease is renewed first.
std::chrono::steady_clock::duration commit_window() { return safe_lease() / 2; }

std::optional<std::chrono::steady_clock::time_point> LockRegistry::fence(const std::string& key) {
  // Held throughout, so the lock cannot be released meanwhile.
  std::lock_guard g(mu_);
  for (auto& [prefix, lock] : locks_)
    if (key.rfind(prefix, 0) == 0) return lock->deadline(commit_window());
  return std::nullopt;
}

// Part n of an upload (from 1). S3 allows 10000 parts of at most 5 GiB,
// and the writer does not know how large the pack will be. The first
// tenth of the parts are of 16 MiB (packs up to 16 GiB); then every 125
// parts (an 80th of the limit) are 16 MiB larger than the ones before:
// 2 TiB fit in 6518 parts of up to 736 MiB, 4 TiB in 8895 of up to
// 1040 MiB, and 10000 parts hold 5.1 TiB (S3's largest object is 5 TiB).
// Growing by steps rather than doubling keeps the largest part, and so
// the spool, about half as large for the same reach.
uint64_t part_size(size_t n) {
  size_t flat = std::max<size_t>(1, max_parts() / 10), step = std::max<size_t>(1, max_parts() / 80);
  uint64_t growths = n <= flat ? 0 : (n - flat + step - 1) / step;
  return std::min<uint64_t>(base_part_size() * (1 + growths), kLargestPart);
}

// What max_parts() parts can hold, for the message when a pack outgrows it.
uint64_t largest_pack() {
  uint64_t total = 0;
  for (size_t n = 1; n <= max_parts(); ++n) total += part_size(n);
  return total;
}

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

// Where parts too large to keep in memory wait for their upload:
// CBTFS_S3_SPOOL_DIR, else TMPDIR, else /var/tmp (a disk: /tmp is often a
// tmpfs, which is memory again).
std::string spool_dir() {
  for (const char* name : {"CBTFS_S3_SPOOL_DIR", "TMPDIR"})
    if (const char* v = std::getenv(name); v && *v) return v;
  return "/var/tmp";
}

// An unlinked file in the spool directory: nobody else sees it, and its
// space comes back when it is closed, however the process ends.
class SpoolFile {
 public:
  // `what` names the part, for messages.
  explicit SpoolFile(std::string what) : dir_(spool_dir()), what_(std::move(what)) {
    fd_ = ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ < 0 && (errno == EOPNOTSUPP || errno == EISDIR)) fd_ = named_then_unlinked();
    if (fd_ < 0) throw error(errno, "cannot create a file for");
  }
  ~SpoolFile() { ::close(fd_); }
  SpoolFile(const SpoolFile&) = delete;
  SpoolFile& operator=(const SpoolFile&) = delete;

  void write(std::span<const std::byte> data) {
    if (auto r = io::write_all(fd_, data.data(), data.size()); r.error) throw error(r.error, "cannot store");
  }
  int fd() const { return fd_; }

 private:
  // A file system without O_TMPFILE: a named file, unlinked at once.
  int named_then_unlinked() {
    std::string name = dir_ + "/.cbtfs-part-XXXXXX";
    int fd = ::mkostemp(name.data(), O_CLOEXEC);
    if (fd >= 0) ::unlink(name.c_str());
    return fd;
  }

  StorageError error(int err, const std::string& what) const {
    return StorageError(what + " " + what_ + " in the spool directory " + dir_ + ": " + std::strerror(err) +
                            " (parts larger than " + mib(base_part_size()) + " wait there for their upload, up to " +
                            std::to_string(kPartsInFlight + 1) +
                            " at once; set CBTFS_S3_SPOOL_DIR to a local directory with room for them)",
                        err);
  }

  std::string dir_, what_;
  int fd_ = -1;
};

// The bytes of one part: in memory while parts are small (most packs
// never touch the disk), else in a spool file, so that memory does not
// grow with the parts.
class Part {
 public:
  Part(uint64_t target, std::string what) {
    if (target > base_part_size()) {
      file_.emplace(std::move(what));
    } else {
      // Room for the record that crosses the target: no reallocation,
      // which would briefly hold the part twice. Untouched pages cost no
      // memory.
      bytes_.reserve(target + (1 << 20));
    }
  }
  void append(std::span<const std::byte> data) {
    if (file_) file_->write(data);
    else bytes_.insert(bytes_.end(), data.begin(), data.end());
    size_ += data.size();
  }
  uint64_t size() const { return size_; }
  const Bytes& bytes() const { return bytes_; }
  Request& attach(Request& r) const { return file_ ? r.with_file_body(file_->fd(), size_) : r.with_body(bytes_); }

 private:
  Bytes bytes_;
  std::optional<SpoolFile> file_;
  uint64_t size_ = 0;
};

// A pack can be terabytes: it streams out in parts while it is written.
// At most kPartsInFlight parts are being sent while the next one fills,
// and a part is dropped once it is stored (only its ETag is kept). Parts
// of 16 MiB are in memory (80 MiB at most); larger ones are in the spool
// directory, which so holds at most five parts. Memory does not grow with
// the pack.
class S3Writer final : public ObjectWriter {
 public:
  S3Writer(s3::Client& c, LockRegistry& locks, std::string key) : c_(c), locks_(locks), key_(std::move(key)) {}
  ~S3Writer() override {
    try {
      wait_parts(0);
    } catch (const std::exception&) {  // failed parts of an upload aborted below
    }
    if (committed_ || upload_id_.empty()) return;
    Request r = Request("DELETE", key_).param("uploadId", upload_id_);
    try {
      c_.send(r);  // best effort: remove_temporaries() aborts what is left
    } catch (const std::exception&) {
    }
  }
  void append(std::span<const std::byte> data) override {
    if (!part_) part_ = new_part();
    part_->append(data);
    size_ += data.size();
    if (part_->size() >= part_size(next_number())) send_part();
  }
  uint64_t size() const override { return size_; }

  void commit() override {
    if (!part_) part_ = new_part();
    if (upload_id_.empty()) {
      commit_small();
      return;
    }
    if (part_->size() > 0) send_part();
    wait_parts(0);
    // Completing an upload overwrites whatever is there: look first.
    if (c_.send(Request("HEAD", key_)).status == 200) fail(c_, "refusing to overwrite", key_, conflict());
    std::string xml = "<CompleteMultipartUpload>";
    for (size_t i = 0; i < etags_.size(); ++i)
      xml += "<Part><PartNumber>" + std::to_string(i + 1) + "</PartNumber><ETag>" + etags_[i] + "</ETag></Part>";
    xml += "</CompleteMultipartUpload>";
    Request r = Request("POST", key_).param("uploadId", upload_id_).with_body(bytes_of(xml));
    Response resp = send_fenced(r);
    // S3 may answer 200 with an error document when completion fails late.
    if (resp.status != 200 || resp.text().find("<Error>") != std::string::npos)
      fail(c_, "cannot complete the upload of", key_, resp);
    committed_ = true;
  }

 private:
  size_t next_number() const { return etags_.size() + 1; }
  // key_ has the repository's prefix already: not describe() + key_.
  std::string url() const { return "s3://" + c_.config().bucket + "/" + key_; }

  std::shared_ptr<Part> new_part() {
    size_t n = next_number();
    std::string what = "part " + std::to_string(n) + " (" + mib(part_size(n)) + ") of " + url();
    return std::make_shared<Part>(part_size(n), what);
  }

  // An object smaller than one part: a single PUT. Its only part is the
  // first, which is always in memory.
  void commit_small() {
    Request r = Request("PUT", key_).header("If-None-Match: *").with_body(part_->bytes());
    Response resp = send_fenced(r);
    if (resp.status == 412 && stored_equals(part_->bytes())) resp.status = 200;  // our own retried PUT
    if (resp.status != 200) fail(c_, resp.status == 412 ? "refusing to overwrite" : "cannot write", key_, resp);
    committed_ = true;
  }

  // A commit under a VDI's lock must be over before the lease could run
  // out: a writer that stalled past it may have lost the lock, and the
  // next holder may be removing this very object.
  Response send_fenced(Request& r) {
    if (auto deadline = locks_.fence(key_)) r.until(*deadline);
    try {
      return c_.send(r);
    } catch (const StorageError& e) {
      if (e.error_number() != ETIMEDOUT) throw;
      throw LockedError(std::string(e.what()) + "; not committed, since the lock's lease may have run out");
    }
  }

  bool stored_equals(const Bytes& want) {
    Response r = c_.send(Request("GET", key_));
    return r.status == 200 && r.body == want;
  }

  void start_upload() {
    // A spool directory that cannot be used is said now, not after the
    // first 16 GiB.
    SpoolFile probe("a part of " + url());
    Response head = c_.send(Request("HEAD", key_));
    if (head.status == 200) fail(c_, "refusing to overwrite", key_, conflict());
    Response resp = c_.send(Request("POST", key_).param("uploads", ""));
    if (resp.status != 200) fail(c_, "cannot start the upload of", key_, resp);
    pugi::xml_document doc;
    doc.load_buffer(resp.body.data(), resp.body.size());
    upload_id_ = doc.child("InitiateMultipartUploadResult").child_value("UploadId");
    if (upload_id_.empty()) fail(c_, "no upload id for", key_, resp);
  }

  // Collects finished parts (oldest first) until at most `keep` are in
  // flight; the first failure is thrown once all have been waited for.
  void wait_parts(size_t keep) {
    std::exception_ptr first;
    while (inflight_.size() > keep) {
      auto& [number, f] = inflight_.front();
      try {
        etags_[number - 1] = f.get();
      } catch (...) {
        if (!first) first = std::current_exception();
      }
      inflight_.pop_front();
    }
    if (first) std::rethrow_exception(first);
  }

  // Said before the part S3 would refuse is sent, rather than after.
  [[noreturn]] void too_large() const {
    throw StorageError("cannot write " + url() + ": the pack is too large for S3: an upload has at most " +
                           std::to_string(max_parts()) + " parts, which hold " + mib(largest_pack()) +
                           " as this writer sizes them",
                       EFBIG);
  }

  void send_part() {
    if (upload_id_.empty()) start_upload();
    size_t number = next_number();
    if (number > max_parts()) too_large();
    wait_parts(kPartsInFlight - 1);
    etags_.emplace_back();
    // The task owns the part and drops it (its memory, or its spool file)
    // as soon as it is stored: a finished future keeps only its ETag.
    std::shared_ptr<Part> part = std::move(part_);
    inflight_.emplace_back(number, std::async(std::launch::async, [this, number, part]() mutable {
      Request r = Request("PUT", key_).param("partNumber", std::to_string(number)).param("uploadId", upload_id_);
      Response resp = c_.send(part->attach(r));
      part.reset();
      if (resp.status != 200) fail(c_, "cannot upload part " + std::to_string(number) + " of", key_, resp);
      return resp.header("etag");
    }));
  }

  s3::Client& c_;
  LockRegistry& locks_;
  std::string key_;
  std::string upload_id_;
  std::shared_ptr<Part> part_;  // the part being filled; none right after one is sent
  uint64_t size_ = 0;
  std::vector<std::string> etags_;  // one per part, filled in as parts finish
  std::deque<std::pair<size_t, std::future<std::string>>> inflight_;
  bool committed_ = false;
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
    return std::make_unique<S3Writer>(c_, locks_, full(key));
  }

  // Fenced like a commit: a writer that may have lost its lock must not
  // remove what the next holder is writing.
  void remove(const std::string& key) override {
    Request req("DELETE", full(key));
    if (auto deadline = locks_.fence(req.key)) req.until(*deadline);
    Response r = c_.send(req);
    if (r.status != 204 && r.status != 200 && r.status != 404) fail(c_, "cannot remove", full(key), r);
  }

  // What a dead writer leaves on S3 is an incomplete multipart upload.
  void remove_temporaries(const std::string& prefix) override { abort_uploads(full(prefix) + "/"); }
  std::vector<std::string> unfinished(const std::string& prefix) override {
    std::vector<std::string> keys;
    std::string root = c_.config().prefix.empty() ? "" : c_.config().prefix + "/";
    for_each_upload(full(prefix) + "/", [&](const std::string& key, const std::string&) {
      if (key.rfind(root, 0) == 0) keys.push_back(key.substr(root.size()));
    });
    return keys;
  }
  void drop_unfinished(const std::string& key) override {
    std::string k = full(key);
    for_each_upload(k, [&](const std::string& listed, const std::string& id) {
      if (listed == k) abort_upload(listed, id);
    });
  }

  std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) override {
    auto lock = acquire(key, holder);
    // Whoever takes a lock cleans up after the dead writers it guarded
    // against (prune as much as a writer): their uploads cost space until
    // aborted. The key's directory is what the lock guards.
    if (lock) abort_uploads(full(key).substr(0, full(key).rfind('/') + 1));
    return lock;
  }

  // Readers of a point announce themselves with lease objects (no flock on S3).
  std::unique_ptr<Claim> claim_shared(const std::string& key) override { return leases_.shared(full("claims/" + key)); }
  std::unique_ptr<Claim> claim_exclusive(const std::string& key) override {
    return leases_.exclusive(full("claims/" + key));
  }

  std::string describe() const override { return c_.describe(); }
  // Each request waits a round trip, and a gateway serves many at once.
  unsigned parallelism() const override { return 16; }

 private:
  void abort_uploads(const std::string& p) {
    for_each_upload(p, [&](const std::string& key, const std::string& id) { abort_upload(key, id); });
  }

  // Every upload under p, page after page: a listing gives 1000 at most.
  void for_each_upload(const std::string& p, const std::function<void(const std::string&, const std::string&)>& fn) {
    std::string key_marker, id_marker;
    for (;;) {
      Request req = Request("GET", "").param("prefix", p).param("uploads", "");
      if (!key_marker.empty()) req.param("key-marker", key_marker).param("upload-id-marker", id_marker);
      Response r = c_.send(req);
      if (r.status != 200) fail(c_, "cannot list the uploads under", p, r);
      pugi::xml_document doc;
      if (!doc.load_buffer(r.body.data(), r.body.size())) fail(c_, "unreadable upload listing of", p, r);
      auto result = doc.child("ListMultipartUploadsResult");
      for (auto u : result.children("Upload")) fn(u.child_value("Key"), u.child_value("UploadId"));
      if (std::string(result.child_value("IsTruncated")) != "true") return;
      std::string next_key = result.child_value("NextKeyMarker"), next_id = result.child_value("NextUploadIdMarker");
      if (next_key.empty() || (next_key == key_marker && next_id == id_marker))
        fail(c_, "the upload listing does not move on under", p, r);
      key_marker = next_key;
      id_marker = next_id;
    }
  }

  std::unique_ptr<StorageLock> acquire(const std::string& key, const std::string& holder) {
    std::string k = full(key);
    std::string body = holder + "\n" + random_token() + "\n";
    auto sent = std::chrono::steady_clock::now();
    Response r = c_.send(Request("PUT", k).header("If-None-Match: *").with_body(bytes_of(body)));
    if (r.status == 200) return make_lock(k, body, r, sent);
    if (r.status != 412) fail(c_, "cannot lock", k, r);
    // Released, held, or left by a holder that died: the gateway's clock
    // decides the last.
    Response cur = c_.send(Request("GET", k));
    if (cur.status == 404) return nullptr;  // removed by an older cbtfs: the caller may try again
    if (cur.status != 200) fail(c_, "cannot read the lock", k, cur);
    if (cur.text() == body)  // our own first PUT landed, and its retry saw it
      return make_lock(k, body, cur, sent);
    time_t modified = curl_getdate(cur.header("last-modified").c_str(), nullptr);
    time_t now = curl_getdate(cur.header("date").c_str(), nullptr);
    bool released = cur.text() == kReleased;
    if (!released && (modified < 0 || now < 0 || now - modified < lease_seconds())) return nullptr;
    // If-Match: of several takers, one wins.
    std::string etag = strip_quotes(cur.header("etag"));
    sent = std::chrono::steady_clock::now();
    Response take = c_.send(Request("PUT", k).header("If-Match: " + etag).with_body(bytes_of(body)));
    if (take.status != 200) return nullptr;
    if (!released)
      std::fprintf(stderr, "cbtfs: took over the lock %s/%s, abandoned %ld s ago by %s", c_.describe().c_str(),
                   k.c_str(), static_cast<long>(now - modified),
                   cur.text().substr(0, cur.text().find('\n') + 1).c_str());
    return make_lock(k, body, take, sent);
  }

  std::unique_ptr<StorageLock> make_lock(const std::string& k, const std::string& body, const Response& r,
                                         std::chrono::steady_clock::time_point sent) {
    return std::make_unique<S3Lock>(c_, locks_, k, body, strip_quotes(r.header("etag")), sent);
  }

  void abort_upload(const std::string& key, const std::string& id) {
    Response a = c_.send(Request("DELETE", key).param("uploadId", id));
    if (a.status != 204 && a.status != 200 && a.status != 404) fail(c_, "cannot abort the upload of", key, a);
  }

  std::string full(const std::string& key) const {
    const std::string& root = c_.config().prefix;
    if (root.empty()) return key;
    return key.empty() ? root : root + "/" + key;
  }

  s3::Client c_;
  LockRegistry locks_;  // the locks this process holds here, which fence its writes
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

// name=value pairs of a URL's query, in order.
std::vector<std::pair<std::string, std::string>> query_settings(const std::string& query) {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t pos = 0; pos < query.size();) {
    auto amp = query.find('&', pos);
    std::string kv = query.substr(pos, amp == std::string::npos ? std::string::npos : amp - pos);
    pos = amp == std::string::npos ? query.size() : amp + 1;
    auto eq = kv.find('=');
    out.emplace_back(kv.substr(0, eq), eq == std::string::npos ? "" : kv.substr(eq + 1));
  }
  return out;
}

constexpr const char* kDefaultConfig = "/etc/cbtfs/s3.conf";

// The settings file: ?config=FILE in the URL, else CBTFS_S3_CONFIG, else
// /etc/cbtfs/s3.conf when it exists. A mount from fstab or by mount(8) at
// boot has no environment to pass credentials in: the URL or the default
// file names them instead (a path is no secret). "" for none.
std::string config_file(const std::string& query) {
  for (auto& [name, value] : query_settings(query))
    if (name == "config") return value;
  if (std::string file = env("CBTFS_S3_CONFIG"); !file.empty()) return file;
  return ::access(kDefaultConfig, F_OK) == 0 ? kDefaultConfig : "";
}

void read_config_file(S3Config& c, const std::string& file) {
  if (file.empty()) return;
  std::ifstream in(file);
  if (!in) throw UsageError("cannot read the S3 settings file " + file);
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
  read_config_file(c, config_file(query));
  apply(c, "endpoint", env("CBTFS_S3_ENDPOINT"));
  apply(c, "endpoint", env("AWS_ENDPOINT_URL"));
  apply(c, "region", env("AWS_DEFAULT_REGION"));
  apply(c, "region", env("AWS_REGION"));
  apply(c, "access_key", env("AWS_ACCESS_KEY_ID"));
  apply(c, "secret_key", env("AWS_SECRET_ACCESS_KEY"));
  apply(c, "ca_file", env("CBTFS_S3_CA_FILE"));
  for (auto& [name, value] : query_settings(query)) {
    if (name == "access_key" || name == "secret_key")
      throw UsageError("credentials do not belong in the repository URL; use AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY or a CBTFS_S3_CONFIG file");
    if (name != "config") apply(c, name, value);
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
