// cbtfs-ingest [OPTIONS] REPO: pulls new points from XenServer into REPO.
// Exit codes: the table of cbtfs/exit_codes.hpp (cbtfs-ingest(1)); 1 when
// at least one selected VDI got no new point.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>

#include "cbtfs/errors.hpp"
#include "cbtfs/exit_codes.hpp"
#include "cbtfs/gc.hpp"
#include "cbtfs/repository.hpp"
#include "exit_status.hpp"
#include "ingest/ingest.hpp"
#include "ingest/run_metrics.hpp"
#include "password.hpp"
#include "progress.hpp"
#include "text.hpp"

using namespace cbtfs;

namespace {

// The ingest's copying on the progress line ("ingest"), its clock started
// when the copying begins rather than when the snapshots are taken.
class ProgressLine : public ingest::ProgressReport {
 public:
  void start() override { bar_.emplace("ingest", 0); }
  void update(uint64_t done, uint64_t total) override {
    bar_->set_total(total);
    bar_->update(done);
  }
  void finish() override { bar_.reset(); }  // clears the line

 private:
  std::optional<Progress> bar_;
};

nlohmann::json to_json(const ingest::Outcome& o) {
  return {{"vdi_uuid", o.vdi_uuid},     {"vdi_name", o.vdi_name},         {"vm_name", o.vm_name},
          {"vm_uuid", o.vm_uuid},       {"ok", o.ok},                     {"error", o.error},
          {"full", o.full},             {"chain_reason", o.chain_reason}, {"point", o.point},
          {"snapshot_uuid", o.snapshot_uuid}, {"virtual_size", o.virtual_size}, {"blocks_read", o.blocks_changed},
          {"bytes_read", o.bytes_read}, {"bytes_stored", o.bytes_stored}, {"seconds", o.seconds},
          {"nbd_host", o.nbd_host}, {"warnings", o.warnings}};
}

int run(int argc, char** argv) {
  CLI::App app{"cbtfs-ingest: back up XenServer disks into a cbtfs repository with changed block tracking",
               "cbtfs-ingest"};
  app.set_version_flag("--version", std::string("cbtfs-ingest ") + CBTFS_VERSION);
  xapi::ClientOptions co;
  ingest::Options io;
  std::string repo_path, password_file;
  bool json = false, quiet = false;
  std::string metrics_file;
  auto started = std::chrono::steady_clock::now();
  app.add_option("--xapi", co.url, "XAPI address, e.g. https://pool-master")->required();
  app.add_option("--user", co.user, "user name")->default_val("root");
  app.add_option("--password-file", password_file, "file holding the password (else $CBTFS_PASSWORD)");
  app.add_option("--vm", io.vms, "VM name or uuid: all its disks, from one snapshot (repeatable)");
  app.add_option("--vdi", io.vdis, "VDI uuid (repeatable)");
  app.add_flag("--all", io.pool.all, "every VM of the pool (no templates, snapshots or control domains)");
  app.add_option("--tag", io.pool.tags, "every VM with this tag (repeatable)");
  app.add_option("--exclude-vm", io.pool.exclude_vms, "leave out this VM (name or uuid) of --all/--tag (repeatable)");
  app.add_option("--exclude-tag", io.pool.exclude_tags, "leave out VMs with this tag from --all/--tag (repeatable)");
  app.add_option("--ca-file", co.ca_file, "CA certificate(s) to verify the host with (default: the system's)");
  app.add_option("--xapi-timeout", co.timeout_seconds, "seconds a XAPI call may take")
      ->default_val(600)->check(CLI::Range(1, 86400));
  app.add_option("--snapshot-timeout", io.snapshot_timeout, "seconds the host may take to snapshot a disk")
      ->default_val(600)->check(CLI::Range(1, 86400));
  bool insecure_nbd = false;
  app.add_flag("--insecure", co.insecure, "do not verify XAPI's TLS certificate (NBD stays pinned)");
  app.add_flag("--insecure-nbd", insecure_nbd,
               "do not verify the NBD server's certificate, and accept NBD without TLS");
  app.add_option("--jobs", io.jobs, "VDIs backed up in parallel")->default_val(2)->check(CLI::Range(1, 16));
  app.add_option("--connections", io.connections, "NBD connections per VDI")->default_val(4)->check(CLI::Range(1, 16));
  app.add_option("--host-connections", io.host_connections,
                 "NBD connections per host across all parallel VDIs (XenServer serves 16 per host, to all clients)")
      ->default_val(8)->check(CLI::Range(1, 16));
  long busy_timeout = 900;
  app.add_option("--busy-timeout", busy_timeout,
                 "seconds to wait for a host whose NBD server is busy (at its connection limit)")
      ->default_val(900)->check(CLI::Range(0, 86400));
  app.add_flag("--json", json, "print a JSON summary on standard output");
  app.add_option("--metrics-file", metrics_file,
                 "write the run's outcome there as a Prometheus text file (node_exporter's textfile collector)");
  app.add_flag("-q,--quiet", quiet, "no progress and no log lines, errors only");
  app.add_option("REPO", repo_path, "repository")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  if (io.vms.empty() && io.vdis.empty() && io.pool.empty())
    throw UsageError("nothing to back up: give --vm, --vdi, --tag or --all");
  if (io.pool.empty() && (!io.pool.exclude_vms.empty() || !io.pool.exclude_tags.empty()))
    throw UsageError("--exclude-vm and --exclude-tag narrow --all or --tag: give one of those");
  for (auto& v : io.vdis) {
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return std::tolower(ch); });
    if (!is_uuid(v)) throw UsageError("--vdi " + v + " is not a uuid");
  }
  if (co.url.find("://") == std::string::npos) co.url = "https://" + co.url;
  io.busy_timeout = std::chrono::seconds(busy_timeout);
  co.password = read_password(password_file);
  // Each opt-out covers one connection: NBD is pinned to the certificate
  // XAPI hands out, so it stays verified unless asked otherwise.
  io.nbd.verify = !insecure_nbd;
  if (co.insecure && !quiet)
    std::fprintf(stderr, "cbtfs-ingest: warning: --insecure: XAPI's certificate is not verified; the NBD "
                         "certificates it hands out are only as trustworthy as that connection\n");
  bool progress = !quiet && isatty(STDERR_FILENO);

  std::shared_ptr<Repository> repo;
  try {
    repo = Repository::open(repo_path);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbtfs-ingest: cannot open repository %s: %s\n", repo_path.c_str(), e.what());
    return dynamic_cast<const KeyError*>(&e) ? kExitKey : kExitRepo;
  }

  xapi::Client client(co);
  try {
    client.login();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbtfs-ingest: cannot log in to %s as %s: %s\n", client.url().c_str(), co.user.c_str(),
                 e.what());
    return kExitXapi;
  }
  if (!client.redirected_from().empty() && !quiet)
    std::fprintf(stderr, "cbtfs-ingest: %s is a pool member; using the pool master at %s\n",
                 client.redirected_from().c_str(), client.url().c_str());
  std::mutex log_mu;
  ingest::Log log = [&](const std::string& line) {
    std::lock_guard g(log_mu);
    if (!quiet || line.find("FAILED") != std::string::npos || line.find("WARNING") != std::string::npos) {
      if (progress) std::fprintf(stderr, "\r\033[K");
      std::fprintf(stderr, "cbtfs-ingest: %s\n", printable(line).c_str());  // names come from the host
    }
  };
  ProgressLine progress_line;
  auto outcomes = ingest::run(client, repo, io, log, progress ? &progress_line : nullptr);
  client.logout();
  try {  // a first backup of many disks adds a segment per pack: lookups stay cheap
    merge_index_segments(*repo, holder_text("cbtfs-ingest"));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbtfs-ingest: WARNING: could not merge the dedup index's segments: %s\n", e.what());
  }

  size_t failed = 0, selected = 0;
  nlohmann::json summary = nlohmann::json::array(), skipped = nlohmann::json::array();
  for (auto& o : outcomes) {
    if (!o.skipped.empty()) {
      skipped.push_back({{"vm_name", o.vm_name}, {"vm_uuid", o.vm_uuid}, {"vdi_uuid", o.vdi_uuid},
                         {"vdi_name", o.vdi_name}, {"reason", o.skipped}});
      continue;
    }
    ++selected;
    failed += !o.ok;
    summary.push_back(to_json(o));
  }
  if (!metrics_file.empty()) {
    ingest::RunSummary rs{outcomes, static_cast<int64_t>(std::time(nullptr)),
                          std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()};
    try {
      ingest::write_metrics_file(metrics_file, rs);
    } catch (const std::exception& e) {
      // The backup itself is done; monitoring will see the file grow old.
      std::fprintf(stderr, "cbtfs-ingest: WARNING: cannot write the metrics file: %s\n", e.what());
    }
  }
  if (json)
    std::printf("%s\n", nlohmann::json{{"ok", failed == 0}, {"vdis", summary}, {"skipped", skipped}}.dump(2).c_str());
  if (!quiet || failed)
    std::fprintf(stderr, "cbtfs-ingest: %zu of %zu VDI(s) backed up%s%s\n", selected - failed, selected,
                 skipped.empty() ? "" : ("; " + std::to_string(skipped.size()) + " not backed up (WARNING lines)").c_str(),
                 failed ? "; see the FAILED lines above" : "");
  return failed ? kExitFailed : kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (...) {
    return report_exception("cbtfs-ingest");
  }
}
