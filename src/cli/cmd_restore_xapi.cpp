// cbtfs-repo restore --xapi URL --sr SR REPO VDI POINT: a point back to
// XenServer as a new VDI. The VDI is created at the point's size, the
// image streamed into it with one HTTP PUT to /import_raw_vdi (XAPI's raw
// import, the same handler xe vdi-import uses), checksums verified on the
// way; a VDI whose upload failed is destroyed, so none is left half filled.
// The handler answers 200 before it has read the body: only the task it is
// given (task_id) says whether the data landed.
#include <curl/curl.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>

#include "cbtfs/errors.hpp"
#include "cbtfs/point_reader.hpp"
#include "commands.hpp"
#include "progress.hpp"
#include "text.hpp"
#include "xapi/client.hpp"
#include "xapi/tasks.hpp"

namespace cbtfs {

ManifestPtr find_point(Repository& repo, const std::string& vdi, const std::string& point);

namespace {

using xapi::Value;

// Feeds libcurl the image in order: data read and verified, holes as zeros,
// then zeros up to the VDI's size (XAPI rounds sizes up to a sector).
struct Source {
  PointReader& reader;
  uint64_t image_size, total, pos = 0;
  Progress& progress;
  std::string error;  // a read failure, reported after curl gives up

  size_t fill(char* out, size_t room) {
    if (pos >= total) return 0;
    size_t n = static_cast<size_t>(std::min<uint64_t>(room, total - pos));
    if (pos >= image_size) {
      std::memset(out, 0, n);
    } else {
      n = static_cast<size_t>(std::min<uint64_t>(n, image_size - pos));
      try {
        n = reader.read(pos, {reinterpret_cast<std::byte*>(out), n});
      } catch (const std::exception& e) {
        error = e.what();
        return CURL_READFUNC_ABORT;
      }
    }
    pos += n;
    progress.update(pos);
    return n;
  }
};

size_t feed(char* out, size_t size, size_t n, void* src) { return static_cast<Source*>(src)->fill(out, size * n); }
// The answer's first KiB, for the error message.
size_t keep_some(char* p, size_t size, size_t n, void* body) {
  auto* b = static_cast<std::string*>(body);
  b->append(p, std::min(size * n, 1024 - std::min<size_t>(1024, b->size())));
  return size * n;
}

void upload(const xapi::ClientOptions& co, const std::string& session, const std::string& vdi_ref,
            const std::string& task, Source& src) {
  CURL* c = curl_easy_init();
  if (!c) throw StorageError("cannot initialise libcurl", ENOMEM);
  std::string base = co.url;
  while (!base.empty() && base.back() == '/') base.pop_back();
  char* s = curl_easy_escape(c, session.c_str(), 0);
  char* v = curl_easy_escape(c, vdi_ref.c_str(), 0);
  char* t = curl_easy_escape(c, task.c_str(), 0);
  std::string url = base + "/import_raw_vdi?format=raw&session_id=" + s + "&vdi=" + v + "&task_id=" + t;
  curl_free(s);
  curl_free(v);
  curl_free(t);
  std::string body;
  char err[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
  curl_easy_setopt(c, CURLOPT_READFUNCTION, feed);
  curl_easy_setopt(c, CURLOPT_READDATA, &src);
  curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(src.total));
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, keep_some);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_UPLOAD_BUFFERSIZE, 2L << 20);
  if (!co.ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, co.ca_file.c_str());
  if (co.insecure) {
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  CURLcode rc = curl_easy_perform(c);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(c);
  if (!src.error.empty()) throw CorruptError(src.error);
  if (rc != CURLE_OK) throw StorageError(std::string("upload to ") + base + " failed: " + (err[0] ? err : curl_easy_strerror(rc)), EIO);
  while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
  if (status != 200)
    throw StorageError("upload to " + base + " refused: HTTP " + std::to_string(status) + (body.empty() ? "" : ": " + body), EIO);
}

// The import's own verdict: HTTP 200 only said the handler started.
void check_import(xapi::Client& client, const std::string& task, long seconds) {
  auto o = xapi::wait_task(client, task, seconds);
  using S = xapi::TaskOutcome::State;
  if (o.state == S::Success) return;
  if (o.state == S::Failure) throw xapi::XapiError("import_raw_vdi", o.error);
  throw StorageError(o.state == S::Pending ? "the host did not finish the import within " + std::to_string(seconds) + " s"
                                           : "the import's task vanished before it reported", EIO);
}

}  // namespace

int cmd_restore_xapi(const RestoreXapiArgs& a) {
  auto repo = open_repository(a.repo);
  ManifestPtr m = find_point(*repo, a.vdi, a.point);
  auto hold = repo->hold_point(*m);  // a prune meanwhile keeps the point until we are done
  if (!hold) throw UsageError("point " + format_point_name(m->time) + " of VDI " + a.vdi + " was just removed");
  xapi::Client client(a.xapi);
  client.login();
  std::string sr = client.call("SR.get_by_uuid", {Value(a.sr)}).str();
  std::string name = a.name.empty() ? (m->vdi_name.empty() ? "restored" : m->vdi_name) + " (restored " +
                                          format_iso_time(m->time) + ")"
                                    : a.name;
  std::map<std::string, Value> rec{
      {"name_label", Value(name)},
      {"name_description", Value("restored by cbtfs-repo from VDI " + a.vdi + ", point " + format_iso_time(m->time))},
      {"SR", Value(sr)},
      {"virtual_size", Value(std::to_string(m->virtual_size))},
      {"type", Value("user")},
      {"sharable", Value(false)},
      {"read_only", Value(false)},
      {"other_config", Value(std::map<std::string, Value>{})},
      {"xenstore_data", Value(std::map<std::string, Value>{})},
      {"sm_config", Value(std::map<std::string, Value>{})},
      {"tags", Value(std::vector<Value>{})}};
  std::string ref = client.call("VDI.create", {Value(rec)}).str();
  try {
    Value vrec = client.call("VDI.get_record", {Value(ref)});
    uint64_t size = static_cast<uint64_t>(vrec.at("virtual_size").to_int());
    if (size < m->virtual_size) throw StorageError("the host made the VDI smaller than the point", EIO);
    PointReader reader(repo, m);
    Progress progress("restore " + format_point_name(m->time), size);
    Source src{reader, m->virtual_size, size, 0, progress, {}};
    std::string task = client.call("task.create", {Value("cbtfs-repo restore"), Value("import into " + ref)}).str();
    try {
      upload(a.xapi, client.session(), ref, task, src);
      check_import(client, task, a.xapi.timeout_seconds);
    } catch (...) {
      xapi::cancel_task(client, task);
      xapi::destroy_task(client, task);
      throw;
    }
    xapi::destroy_task(client, task);
    progress.finish();
    std::printf("%s\n", vrec.at("uuid").str().c_str());
    std::fprintf(stderr, "cbtfs-repo: restored %s of VDI %s as VDI %s ('%s', %s) in SR %s\n",
                 format_point_name(m->time).c_str(), a.vdi.c_str(), vrec.at("uuid").str().c_str(), printable(name).c_str(),
                 human_bytes(size).c_str(), a.sr.c_str());
  } catch (...) {
    try {
      client.call("VDI.destroy", {Value(ref)});
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cbtfs-repo: cannot remove the half-restored VDI %s: %s\n", ref.c_str(), e.what());
    }
    throw;
  }
  return kExitOk;
}

}  // namespace cbtfs
