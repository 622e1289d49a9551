// Copying a job's disks: what changed since the previous point (or why the
// chain breaks), from which host, and the commit.
#include <algorithm>
#include <chrono>
#include <thread>

#include "backup_job.hpp"
#include "cbtfs/human_bytes.hpp"
#include "changed_blocks.hpp"

namespace cbtfs::ingest {

namespace {
constexpr uint64_t kMaxExtentBlocks = 32;  // 2 MiB NBD requests
}

// The disks of a VM copy side by side, each in one of the run's --jobs
// slots, so that a VM of many disks is not copied one disk at a time.
void BackupJob::transfer_all() {
  std::vector<Task*> ready;
  for (auto& t : tasks_)
    if (t.writer && t.snap && t.out.error.empty()) ready.push_back(&t);
  auto one = [this](Task& t) {
    RunContext::Slot slot(ctx_);
    try {
      transfer_one(t);
    } catch (const std::exception& e) {
      fail(t, e.what());
    }
  };
  if (ready.size() == 1) return one(*ready[0]);
  std::vector<std::thread> threads;
  for (Task* t : ready) threads.emplace_back(one, std::ref(*t));
  for (auto& th : threads) th.join();
}

// Why this point cannot be a delta of the writer's parent, or "".
std::string BackupJob::chain_break(Task& t, std::vector<bool>& bits) {
  auto parent = t.writer->parent();
  if (!parent) {
    auto latest = ctx_.repo->latest(t.vdi.uuid);
    return latest ? "virtual size changed from " + std::to_string(latest->virtual_size) + " to " +
                        std::to_string(t.vdi.virtual_size)
                  : "";
  }
  if (parent->snapshot_uuid.empty()) return "the previous point was not taken from this host";
  if (t.cbt_was_off) return "changed block tracking had been disabled on the host";
  // The previous snapshot is among the disk's that prepare() read; asked
  // for by uuid only when it is not.
  std::string prev_ref;
  for (auto& s : known_snapshots(t))
    if (s.uuid == parent->snapshot_uuid) prev_ref = s.ref;
  if (prev_ref.empty()) {
    try {
      prev_ref = c_.call("VDI.get_by_uuid", {xapi::Value(parent->snapshot_uuid)}).str();
    } catch (const xapi::XapiError& e) {
      if (e.code() == "UUID_INVALID" || e.code() == "HANDLE_INVALID")
        return "the previous snapshot " + parent->snapshot_uuid + " is gone from the host";
      throw;
    }
  }
  try {
    bits = decode_changed_blocks(list_changed_blocks(c_, prev_ref, t.snap->ref), block_count(t.vdi.virtual_size));
  } catch (const xapi::XapiError& e) {
    if (e.code() == "HANDLE_INVALID" && e.param(1) == prev_ref)  // destroyed since the job read the list
      return "the previous snapshot " + parent->snapshot_uuid + " is gone from the host";
    if (e.code() == "VDI_NO_CBT_METADATA") return "the previous snapshot has no changed-block metadata";
    if (e.code().rfind("SR_BACKEND_FAILURE_46", 0) == 0 || e.code().rfind("SR_BACKEND_FAILURE_45", 0) == 0)
      return "the host cannot relate the previous snapshot to this one (" + e.code() + ": " + e.param(1) + ")";
    throw;
  }
  return "";
}

void BackupJob::transfer_one(Task& t) {
  auto start = std::chrono::steady_clock::now();
  std::vector<bool> bits;
  std::string reason = chain_break(t, bits);
  bool full = !t.writer->parent() || !reason.empty();
  if (full && t.writer->parent()) t.writer->start_new_chain(reason);
  if (!reason.empty()) say(t, "starting a new full chain: " + reason);
  uint64_t nblocks = block_count(t.vdi.virtual_size);
  auto extents = full ? all_extents(nblocks, kMaxExtentBlocks) : changed_extents(bits, kMaxExtentBlocks);
  uint64_t todo = 0;
  for (auto& e : extents) todo += std::min<uint64_t>(e.count * kBlockSize, t.vdi.virtual_size - e.first * kBlockSize);
  auto targets = nbd_targets(c_, *t.snap);
  if (ctx_.opts.nbd.verify) {
    bool offered = !targets.empty();
    std::erase_if(targets, [](const nbd::Target& x) { return x.cert.empty(); });
    if (targets.empty() && offered)
      throw std::runtime_error(
          "the host offers NBD only without TLS (an 'insecure_nbd' network); give --insecure-nbd to accept that");
  }
  if (targets.empty())
    throw std::runtime_error(
        "the host offers no NBD access: give a network the 'nbd' purpose (xe network-param-add "
        "param-name=purpose param-key=nbd uuid=...)");
  Source source = source_for(t, targets);
  say(t, std::string(full ? "full" : "incremental") + ": reading " + human_bytes(todo) + " over NBD from host " +
             source.host);
  ctx_.add_to_copy(todo);
  uint64_t counted = 0;
  auto stats = ingest::transfer(source, ctx_.opts.connections, extents, t.vdi.virtual_size, *t.writer,
                                [&](uint64_t done) {
                                  ctx_.copied(done - counted);
                                  counted = done;
                                });
  Manifest m = t.writer->commit();
  t.committed = true;
  t.out.ok = true;
  t.out.full = full;
  t.out.chain_reason = m.chain_reason;
  t.out.point = format_point_name(m.time) + ".raw";
  t.out.last_point_time = m.time;
  t.out.snapshot_uuid = t.snap->uuid;
  t.out.blocks_changed = stats.blocks;
  t.out.bytes_read = stats.bytes_read;
  t.out.bytes_stored = m.bytes_stored;
  t.out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The host to read t from: of those get_nbd_info lists (each may have
// several addresses), the one where the run holds the fewest connections.
// Only that host's addresses are tried, so every connection counts
// against the budget of the host it really goes to.
Source BackupJob::source_for(Task& t, const std::vector<nbd::Target>& targets) {
  std::vector<std::string> hosts;
  for (auto& x : targets)
    if (std::find(hosts.begin(), hosts.end(), host_key(x)) == hosts.end()) hosts.push_back(host_key(x));
  Source s;
  s.host = ctx_.budget.pick(hosts);
  for (auto& x : targets)
    if (host_key(x) == s.host) s.targets.push_back(x);
  s.opts = ctx_.opts.nbd;
  s.budget = &ctx_.budget;
  s.busy_timeout = ctx_.opts.busy_timeout;
  s.read_ahead = ctx_.read_ahead();
  s.log = [this, &t](const std::string& m) { say(t, m); };
  t.out.nbd_host = s.host;
  return s;
}

}  // namespace cbtfs::ingest
