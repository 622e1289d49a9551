#include "vdi_import.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <map>
#include <vector>

#include "curl_options.hpp"
#include "tasks.hpp"

namespace cbtfs::xapi {

std::string create_vdi(Client& c, const NewVdi& vdi) {
  std::string sr = c.call("SR.get_by_uuid", {Value(vdi.sr_uuid)}).str();
  std::map<std::string, Value> rec{
      {"name_label", Value(vdi.name)},
      {"name_description", Value(vdi.description)},
      {"SR", Value(sr)},
      {"virtual_size", Value(std::to_string(vdi.virtual_size))},
      {"type", Value("user")},
      {"sharable", Value(false)},
      {"read_only", Value(false)},
      {"other_config", Value(std::map<std::string, Value>{})},
      {"xenstore_data", Value(std::map<std::string, Value>{})},
      {"sm_config", Value(std::map<std::string, Value>{})},
      {"tags", Value(std::vector<Value>{})}};
  return c.call("VDI.create", {Value(rec)}).str();
}

VdiRecord get_vdi_record(Client& c, const std::string& ref) {
  Value rec = c.call("VDI.get_record", {Value(ref)});
  return {rec.at("uuid").str(), static_cast<uint64_t>(rec.at("virtual_size").to_int())};
}

void destroy_vdi(Client& c, const std::string& ref) { c.call("VDI.destroy", {Value(ref)}); }

namespace {

// A request body, produced as libcurl asks for it; rewound when a 302 makes
// it go again to another host.
class Body {
 public:
  virtual ~Body() = default;
  virtual uint64_t size() const = 0;
  virtual const char* query() const = 0;  // what the body's format adds to the URL
  // Up to room bytes of the body; 0 at its end.
  virtual size_t fill(char* out, size_t room) = 0;
  virtual void rewind() = 0;
};

// Calls source until out is full: a source may hand back less than asked.
void read_exactly(const ImportSource& source, uint64_t offset, char* out, size_t n) {
  while (n) {
    size_t got = source(offset, {reinterpret_cast<std::byte*>(out), n});
    if (got == 0 || got > n) throw ImportError("the data to upload ended early at byte " + std::to_string(offset));
    offset += got;
    out += got;
    n -= got;
  }
}

// format=raw: the disk's bytes from 0 to size.
class RawBody : public Body {
 public:
  RawBody(const ImportSource& source, uint64_t size) : source_(source), size_(size) {}
  uint64_t size() const override { return size_; }
  const char* query() const override { return "format=raw"; }
  size_t fill(char* out, size_t room) override {
    size_t n = static_cast<size_t>(std::min<uint64_t>(room, size_ - pos_));
    if (n == 0) return 0;
    n = source_(pos_, {reinterpret_cast<std::byte*>(out), n});
    pos_ += n;
    return n;
  }
  void rewind() override { pos_ = 0; }

 private:
  const ImportSource& source_;
  uint64_t size_, pos_ = 0;
};

void put_le(char* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// format=raw&chunked=true: the extents cut into chunks of at most kMaxChunk,
// each a header and its data, then the last chunk, {0, 0}.
class ChunkedBody : public Body {
 public:
  ChunkedBody(const ImportSource& source, std::span<const Extent> extents) : source_(source) {
    for (const Extent& e : extents)
      for (uint64_t off = e.offset, end = e.offset + e.length; off < end; off += kMaxChunk)
        chunks_.push_back({off, std::min(kMaxChunk, end - off)});
    chunks_.push_back({0, 0});
    size_ = chunked_body_size(extents);
  }
  uint64_t size() const override { return size_; }
  const char* query() const override { return "format=raw&chunked=true"; }
  size_t fill(char* out, size_t room) override {
    size_t done = 0;
    while (done < room && next_ < chunks_.size()) {
      const Extent& c = chunks_[next_];
      if (at_ < kChunkHeader) {  // the header, possibly across calls
        char header[kChunkHeader];
        put_le(header, c.offset, 8);
        put_le(header + 8, c.length, 4);
        size_t n = std::min<size_t>(room - done, kChunkHeader - at_);
        std::memcpy(out + done, header + at_, n);
        at_ += n;
        done += n;
      } else {
        uint64_t in = at_ - kChunkHeader;
        size_t n = static_cast<size_t>(std::min<uint64_t>(room - done, c.length - in));
        read_exactly(source_, c.offset + in, out + done, n);
        at_ += n;
        done += n;
      }
      if (at_ == kChunkHeader + chunks_[next_].length) {
        ++next_;
        at_ = 0;
      }
    }
    return done;
  }
  void rewind() override { next_ = 0, at_ = 0; }

 private:
  const ImportSource& source_;
  std::vector<Extent> chunks_;  // the last one is {0, 0}
  uint64_t size_ = 0;
  size_t next_ = 0;  // the chunk being sent
  uint64_t at_ = 0;  // how much of it (header included) went
};

// Feeds libcurl the body; what the source throws is kept for later.
struct Upload {
  Body& body;
  std::exception_ptr failed;  // the source's, rethrown once curl has given up

  size_t fill(char* out, size_t room) {
    try {
      return body.fill(out, room);
    } catch (...) {
      failed = std::current_exception();
      return CURL_READFUNC_ABORT;
    }
  }
};

size_t feed(char* out, size_t size, size_t n, void* upload) { return static_cast<Upload*>(upload)->fill(out, size * n); }
// The answer's first KiB, for the error message.
size_t keep_some(char* p, size_t size, size_t n, void* body) {
  auto* b = static_cast<std::string*>(body);
  b->append(p, std::min(size * n, 1024 - std::min<size_t>(1024, b->size())));
  return size * n;
}

std::string scheme_of(const std::string& url) { return url.substr(0, url.find("://")); }
// scheme://host[:port], for messages: the query carries the session.
std::string host_part(const std::string& url) {
  size_t start = url.find("://");
  start = start == std::string::npos ? 0 : start + 3;
  return url.substr(0, url.find_first_of("/?", start));
}

constexpr int kMaxRedirects = 5;

void put_body(Client& c, const std::string& vdi_ref, const std::string& task, Body& body) {
  // Where the calls go: the pool master when login was sent there. It
  // answers 302 when another host must write the VDI's SR.
  std::string base = c.url();
  while (!base.empty() && base.back() == '/') base.pop_back();
  std::string url;
  {
    CURL* h = curl_easy_init();
    if (!h) throw ImportError("cannot initialise libcurl");
    char* s = curl_easy_escape(h, c.session().c_str(), 0);
    char* v = curl_easy_escape(h, vdi_ref.c_str(), 0);
    char* t = curl_easy_escape(h, task.c_str(), 0);
    url = base + "/import_raw_vdi?" + body.query() + "&session_id=" + s + "&vdi=" + v + "&task_id=" + t;
    curl_free(s);
    curl_free(v);
    curl_free(t);
    curl_easy_cleanup(h);
  }
  for (int hops = 0;; ++hops) {
    body.rewind();
    Upload up{body, {}};
    std::string answer;
    char err[CURL_ERROR_SIZE] = {0};
    CURL* h = curl_easy_init();
    if (!h) throw ImportError("cannot initialise libcurl");
    // Headers first, the body once the host said 100 Continue (or a second
    // went by): a 302 then costs no body sent to the wrong host.
    curl_slist* headers = curl_slist_append(nullptr, "Expect: 100-continue");
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_READFUNCTION, feed);
    curl_easy_setopt(h, CURLOPT_READDATA, &up);
    curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(body.size()));
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, keep_some);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &answer);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
    curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, 2L << 20);
    apply_connection_options(h, c.options());
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    char* location = nullptr;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(h, CURLINFO_REDIRECT_URL, &location);
    std::string next = location ? location : "";
    curl_easy_cleanup(h);
    curl_slist_free_all(headers);
    if (up.failed) std::rethrow_exception(up.failed);
    std::string where = host_part(url);
    // A host that cannot see the SR names one that can, the query (session,
    // task) kept. Its answer may beat the end of the body it did not read:
    // the status counts, not how the sending ended.
    if ((status == 301 || status == 302 || status == 303 || status == 307 || status == 308) && !next.empty()) {
      if (hops == kMaxRedirects)
        throw ImportError("upload to " + where + " redirected more than " + std::to_string(kMaxRedirects) + " times");
      if (scheme_of(url) == "https" && scheme_of(next) != "https")
        throw ImportError(where + " redirected the upload to " + host_part(next) + ", which is not HTTPS");
      url = next;
      continue;
    }
    if (rc != CURLE_OK) throw ImportError("upload to " + where + " failed: " + (err[0] ? err : curl_easy_strerror(rc)));
    while (!answer.empty() && (answer.back() == '\n' || answer.back() == '\r')) answer.pop_back();
    if (status != 200)
      throw ImportError("upload to " + where + " refused: HTTP " + std::to_string(status) +
                        (answer.empty() ? "" : ": " + answer));
    return;
  }
}

// The import's own verdict: HTTP 200 only said the handler started.
void check_import(Client& c, const std::string& task, long seconds) {
  auto o = wait_task(c, task, seconds);
  using S = TaskOutcome::State;
  if (o.state == S::Success) return;
  if (o.state == S::Failure) throw XapiError("import_raw_vdi", o.error);
  throw ImportError(o.state == S::Pending ? "the host did not finish the import within " + std::to_string(seconds) + " s"
                                          : "the import's task vanished before it reported");
}

void import_body(Client& c, const std::string& vdi_ref, Body& body) {
  std::string task = c.call("task.create", {Value("cbtfs-repo restore"), Value("import into " + vdi_ref)}).str();
  try {
    put_body(c, vdi_ref, task, body);
    check_import(c, task, c.options().timeout_seconds);
  } catch (...) {
    cancel_task(c, task);
    destroy_task(c, task);
    throw;
  }
  destroy_task(c, task);
}

}  // namespace

uint64_t chunked_body_size(std::span<const Extent> extents) {
  uint64_t n = kChunkHeader;  // the last chunk
  for (const Extent& e : extents) n += e.length + kChunkHeader * ((e.length + kMaxChunk - 1) / kMaxChunk);
  return n;
}

void import_raw_vdi(Client& c, const std::string& vdi_ref, uint64_t size, const ImportSource& source) {
  RawBody body(source, size);
  import_body(c, vdi_ref, body);
}

void import_raw_vdi_sparse(Client& c, const std::string& vdi_ref, std::span<const Extent> extents,
                           const ImportSource& source) {
  ChunkedBody body(source, extents);
  import_body(c, vdi_ref, body);
}

}  // namespace cbtfs::xapi
