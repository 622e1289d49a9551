#include "vdi_import.hpp"

#include <algorithm>
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

// Feeds libcurl the source's bytes in order, size of them in all.
struct Upload {
  const ImportSource& source;
  uint64_t size, pos = 0;
  std::exception_ptr failed;  // the source's, rethrown once curl has given up

  size_t fill(char* out, size_t room) {
    if (pos >= size) return 0;
    size_t n = static_cast<size_t>(std::min<uint64_t>(room, size - pos));
    try {
      n = source(pos, {reinterpret_cast<std::byte*>(out), n});
    } catch (...) {
      failed = std::current_exception();
      return CURL_READFUNC_ABORT;
    }
    pos += n;
    return n;
  }
};

size_t feed(char* out, size_t size, size_t n, void* upload) { return static_cast<Upload*>(upload)->fill(out, size * n); }
// The answer's first KiB, for the error message.
size_t keep_some(char* p, size_t size, size_t n, void* body) {
  auto* b = static_cast<std::string*>(body);
  b->append(p, std::min(size * n, 1024 - std::min<size_t>(1024, b->size())));
  return size * n;
}

void put_raw(Client& c, const std::string& vdi_ref, const std::string& task, Upload& up) {
  CURL* h = curl_easy_init();
  if (!h) throw ImportError("cannot initialise libcurl");
  // The address given, also when login moved the calls to the pool master
  // (url()): the session is valid pool-wide, and the upload has always gone
  // there.
  std::string base = c.redirected_from().empty() ? c.url() : c.redirected_from();
  while (!base.empty() && base.back() == '/') base.pop_back();
  char* s = curl_easy_escape(h, c.session().c_str(), 0);
  char* v = curl_easy_escape(h, vdi_ref.c_str(), 0);
  char* t = curl_easy_escape(h, task.c_str(), 0);
  std::string url = base + "/import_raw_vdi?format=raw&session_id=" + s + "&vdi=" + v + "&task_id=" + t;
  curl_free(s);
  curl_free(v);
  curl_free(t);
  std::string body;
  char err[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
  curl_easy_setopt(h, CURLOPT_READFUNCTION, feed);
  curl_easy_setopt(h, CURLOPT_READDATA, &up);
  curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(up.size));
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, keep_some);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
  curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, 2L << 20);
  apply_connection_options(h, c.options());
  CURLcode rc = curl_easy_perform(h);
  long status = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(h);
  if (up.failed) std::rethrow_exception(up.failed);
  if (rc != CURLE_OK) throw ImportError(std::string("upload to ") + base + " failed: " + (err[0] ? err : curl_easy_strerror(rc)));
  while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
  if (status != 200)
    throw ImportError("upload to " + base + " refused: HTTP " + std::to_string(status) + (body.empty() ? "" : ": " + body));
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

}  // namespace

void import_raw_vdi(Client& c, const std::string& vdi_ref, uint64_t size, const ImportSource& source) {
  Upload up{source, size, 0, {}};
  std::string task = c.call("task.create", {Value("cbtfs-repo restore"), Value("import into " + vdi_ref)}).str();
  try {
    put_raw(c, vdi_ref, task, up);
    check_import(c, task, c.options().timeout_seconds);
  } catch (...) {
    cancel_task(c, task);
    destroy_task(c, task);
    throw;
  }
  destroy_task(c, task);
}

}  // namespace cbtfs::xapi
