#include "run_metrics.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <map>
#include <sstream>
#include <system_error>

namespace cbtfs::ingest {

namespace {

// Label values escape backslash, double quote and line feed; nothing else.
std::string quoted(const std::string& v) {
  std::string out = "\"";
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out + "\"";
}

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

class Writer {
 public:
  // One # HELP and # TYPE per metric, before its samples.
  void family(const std::string& name, const std::string& help, const char* type = "gauge") {
    out_ << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
  }
  void sample(const std::string& name, const std::string& labels, double v) {
    out_ << name << (labels.empty() ? "" : "{" + labels + "}") << " " << number(v) << "\n";
  }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
};

std::string vdi_labels(const Outcome& o) {
  return "vdi_uuid=" + quoted(o.vdi_uuid) + ",vdi_name=" + quoted(o.vdi_name) + ",vm_name=" + quoted(o.vm_name) +
         ",vm_uuid=" + quoted(o.vm_uuid);
}

struct VmState {
  std::string name;
  bool ok = true;
  int64_t oldest = 0;  // the oldest disk's last success; 0 when a disk has none
  bool any_missing = false;
};

}  // namespace

std::string render_metrics(const RunSummary& s) {
  std::vector<const Outcome*> vdis, skipped;
  for (auto& o : s.outcomes) (o.skipped.empty() ? vdis : skipped).push_back(&o);
  size_t failed = 0, breaks = 0;
  for (auto* o : vdis) {
    failed += !o->ok;
    breaks += o->ok && !o->chain_reason.empty();
  }
  Writer w;
  w.family("cbtfs_ingest_run_success", "1 when every selected VDI got a new point in the last run, else 0.");
  w.sample("cbtfs_ingest_run_success", "", failed == 0);
  w.family("cbtfs_ingest_run_end_timestamp_seconds", "When the last run ended.");
  w.sample("cbtfs_ingest_run_end_timestamp_seconds", "", static_cast<double>(s.end_time));
  w.family("cbtfs_ingest_run_duration_seconds", "How long the last run took.");
  w.sample("cbtfs_ingest_run_duration_seconds", "", s.seconds);
  w.family("cbtfs_ingest_run_vdis", "VDIs of the last run by outcome (skipped: found by --all/--tag, no CBT).");
  w.sample("cbtfs_ingest_run_vdis", "outcome=\"ok\"", static_cast<double>(vdis.size() - failed));
  w.sample("cbtfs_ingest_run_vdis", "outcome=\"failed\"", static_cast<double>(failed));
  w.sample("cbtfs_ingest_run_vdis", "outcome=\"skipped\"", static_cast<double>(skipped.size()));
  w.family("cbtfs_ingest_run_chain_breaks", "Full points the last run took because a CBT chain broke.");
  w.sample("cbtfs_ingest_run_chain_breaks", "", static_cast<double>(breaks));

  w.family("cbtfs_ingest_vdi_success", "1 when the last run committed a new point of the VDI, else 0.");
  for (auto* o : vdis) w.sample("cbtfs_ingest_vdi_success", vdi_labels(*o), o->ok);
  w.family("cbtfs_ingest_vdi_last_success_timestamp_seconds",
           "Time of the VDI's newest point in the repository (absent: it has none).");
  for (auto* o : vdis)
    if (o->last_point_time > 0)
      w.sample("cbtfs_ingest_vdi_last_success_timestamp_seconds", vdi_labels(*o), static_cast<double>(o->last_point_time));
  w.family("cbtfs_ingest_vdi_read_bytes", "Bytes the last run read over NBD for the VDI.");
  for (auto* o : vdis) w.sample("cbtfs_ingest_vdi_read_bytes", vdi_labels(*o), static_cast<double>(o->bytes_read));
  w.family("cbtfs_ingest_vdi_stored_bytes", "Bytes the last run's point added to the repository (compressed).");
  for (auto* o : vdis) w.sample("cbtfs_ingest_vdi_stored_bytes", vdi_labels(*o), static_cast<double>(o->bytes_stored));
  w.family("cbtfs_ingest_vdi_duration_seconds", "Time the last run spent reading and storing the VDI.");
  for (auto* o : vdis) w.sample("cbtfs_ingest_vdi_duration_seconds", vdi_labels(*o), o->seconds);
  w.family("cbtfs_ingest_vdi_full", "1 when the last run's point is a full one (a first point or a chain break).");
  for (auto* o : vdis)
    if (o->ok) w.sample("cbtfs_ingest_vdi_full", vdi_labels(*o), o->full);
  w.family("cbtfs_ingest_vdi_chain_break", "Present, 1, when the last run started a new chain; reason says why.");
  for (auto* o : vdis)
    if (o->ok && !o->chain_reason.empty())
      w.sample("cbtfs_ingest_vdi_chain_break", vdi_labels(*o) + ",reason=" + quoted(o->chain_reason), 1);

  std::map<std::string, VmState> vms;  // by uuid
  for (auto* o : vdis) {
    if (o->vm_uuid.empty()) continue;
    VmState& v = vms[o->vm_uuid];
    v.name = o->vm_name;
    v.ok = v.ok && o->ok;
    if (o->last_point_time <= 0) v.any_missing = true;
    else if (v.oldest == 0 || o->last_point_time < v.oldest) v.oldest = o->last_point_time;
  }
  auto vm_labels = [](const std::string& uuid, const VmState& v) {
    return "vm_name=" + quoted(v.name) + ",vm_uuid=" + quoted(uuid);
  };
  w.family("cbtfs_ingest_vm_success", "1 when the last run committed a new point of every selected disk of the VM.");
  for (auto& [uuid, v] : vms) w.sample("cbtfs_ingest_vm_success", vm_labels(uuid, v), v.ok);
  w.family("cbtfs_ingest_vm_last_success_timestamp_seconds",
           "The oldest of the VM's disks' newest points: the VM is backed up as of then (absent: a disk has none).");
  for (auto& [uuid, v] : vms)
    if (!v.any_missing) w.sample("cbtfs_ingest_vm_last_success_timestamp_seconds", vm_labels(uuid, v), static_cast<double>(v.oldest));
  w.family("cbtfs_ingest_skipped", "Present, 1, for a disk (or VM, vdi_uuid empty) --all/--tag found but cannot back up.");
  for (auto* o : skipped) w.sample("cbtfs_ingest_skipped", vdi_labels(*o), 1);
  return w.text();
}

void write_metrics_file(const std::string& path, const RunSummary& summary) {
  std::string text = render_metrics(summary);
  std::string tmp = path + ".tmp." + std::to_string(getpid());
  auto fail = [&](const std::string& what) {
    int e = errno;
    unlink(tmp.c_str());
    throw std::system_error(e, std::generic_category(), what);
  };
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "cannot create " + tmp);
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      close(fd);
      fail("cannot write " + tmp);
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    close(fd);
    fail("cannot write " + tmp);
  }
  if (close(fd) != 0) fail("cannot write " + tmp);
  if (rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename " + tmp + " to " + path);
}

}  // namespace cbtfs::ingest
