// cbtfs-repo rollback --xapi URL REPO VDI POINT: the original VDI back to a
// point, writing only the blocks that differ from it (a quick rollback).
//
// What may differ from POINT is the union of two sets:
//  - the repository's: blocks where POINT and the VDI's latest point differ,
//    from their index trees (repo/point_diff);
//  - the host's: blocks CBT logged since the latest point, from the latest
//    point's metadata-only snapshot to a snapshot taken now, the way the
//    ingest takes it (journaled). That snapshot is the way back: kept with
//    --keep-undo (or when the write fails), else destroyed once the write
//    landed.
// The union goes with XAPI's chunked raw import into the VDI itself. When
// the host cannot say what changed (CBT off since, the metadata snapshot
// gone, the VDI resized, ...), every byte of POINT goes, zeros included.
//
// The next ingest stays incremental and correct without help: the import's
// writes are logged by CBT like the guest's, and the ingest lists changed
// blocks from the latest point's snapshot, which the rollback leaves alone.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <optional>
#include <span>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/point_diff.hpp"
#include "cbtfs/point_reader.hpp"
#include "commands.hpp"
#include "ingest/changed_blocks.hpp"
#include "ingest/ingest.hpp"
#include "ingest/xapi_ops.hpp"
#include "progress.hpp"
#include "text.hpp"
#include "xapi/client.hpp"
#include "xapi/vdi_import.hpp"

namespace cbtfs {

namespace {

using ingest::VdiInfo;
using xapi::Value;

constexpr const char* kNullRef = "OpaqueRef:NULL";

std::string text_of(const Value& rec, const char* key) { return rec.has(key) ? rec.at(key).str() : std::string(); }
bool flag_of(const Value& rec, const char* key) { return rec.has(key) && rec.at(key).to_bool(); }

// Refuses a VDI a VM may be using: plugged anywhere, or of a VM that is not
// halted (a suspended VM's memory image expects the disk as it left it).
void check_not_in_use(xapi::Client& c, const VdiInfo& vdi) {
  Value rec = c.call("VDI.get_record", {Value(vdi.ref)});
  if (!rec.has("VBDs")) return;
  for (auto& vbd_ref : rec.at("VBDs").array()) {
    Value vbd = c.call("VBD.get_record", {vbd_ref});
    std::string vm = text_of(vbd, "VM");
    std::string who = "a VM";
    std::string state;
    if (!vm.empty() && vm != kNullRef) {
      Value r = c.call("VM.get_record", {Value(vm)});
      who = std::string(flag_of(r, "is_control_domain") ? "the control domain " : "VM ") + "'" +
            printable(text_of(r, "name_label")) + "' (" + text_of(r, "uuid") + ")";
      state = text_of(r, "power_state");
      if (!flag_of(r, "is_a_snapshot") && !flag_of(r, "is_a_template") && !state.empty() && state != "Halted")
        throw UsageError("VDI " + vdi.uuid + " belongs to " + who + ", which is " + state +
                         ": shut the VM down before a rollback writes into its disk");
    }
    if (flag_of(vbd, "currently_attached"))
      throw UsageError("VDI " + vdi.uuid + " is attached to " + who + ": unplug it before a rollback");
  }
}

// The blocks CBT logged between the latest point's snapshot and `to` (a
// snapshot taken now, or the VDI itself for --dry-run); empty reason when
// known, else why not.
std::string cbt_diff(xapi::Client& c, const Manifest& latest, const VdiInfo& vdi, const std::string& to_ref,
                     std::vector<bool>& bits) {
  if (latest.snapshot_uuid.empty()) return "the latest point was not taken from this host";
  if (!vdi.cbt_enabled) return "changed block tracking is disabled on the VDI";
  if (latest.virtual_size != vdi.virtual_size)
    return "the VDI was resized since the latest point (" + std::to_string(latest.virtual_size) + " to " +
           std::to_string(vdi.virtual_size) + " bytes)";
  std::string from;
  try {
    from = c.call("VDI.get_by_uuid", {Value(latest.snapshot_uuid)}).str();
  } catch (const xapi::XapiError& e) {
    if (e.code() == "UUID_INVALID" || e.code() == "HANDLE_INVALID")
      return "the latest point's snapshot " + latest.snapshot_uuid + " is gone from the host";
    throw;
  }
  try {
    bits = ingest::decode_changed_blocks(ingest::list_changed_blocks(c, from, to_ref), block_count(vdi.virtual_size));
  } catch (const xapi::XapiError& e) {
    // Whatever the host answers, writing everything is right.
    std::string why = e.code();
    for (size_t i = 1; i < e.description().size(); ++i)
      if (!e.description()[i].empty()) why += " " + e.description()[i];
    return "the host cannot list the changed blocks (" + why + ")";
  } catch (const ingest::BitmapError& e) {
    return std::string("the host's changed-block bitmap is unreadable (") + e.what() + ")";
  }
  return "";
}

// Byte extents of the blocks set, the last one cut at size.
std::vector<xapi::Extent> extents_of(const std::vector<bool>& bits, uint64_t size) {
  std::vector<xapi::Extent> out;
  for (uint64_t b = 0; b < bits.size();) {
    if (!bits[b]) {
      ++b;
      continue;
    }
    uint64_t e = b;
    while (e < bits.size() && bits[e]) ++e;
    uint64_t off = b * kBlockSize, end = std::min<uint64_t>(e * kBlockSize, size);
    if (end > off) out.push_back({off, end - off});
    b = e;
  }
  return out;
}

uint64_t count_set(const std::vector<bool>& bits) { return static_cast<uint64_t>(std::count(bits.begin(), bits.end(), true)); }

std::string blocks_text(uint64_t n) { return std::to_string(n) + (n == 1 ? " block" : " blocks"); }

}  // namespace

int cmd_rollback(const RollbackArgs& a) {
  auto repo = open_repository(a.repo);
  ManifestPtr m = find_point(*repo, a.vdi, a.point);
  ManifestPtr latest = repo->latest(a.vdi);
  auto hold = repo->hold_point(*m);
  auto hold_latest = latest ? repo->hold_point(*latest) : nullptr;
  if (!hold || !latest || !hold_latest)
    throw UsageError("point " + format_point_name(m->time) + " of VDI " + a.vdi + " was just removed");
  const std::string point_name = format_point_name(m->time);

  xapi::Client client(a.xapi);
  client.login();
  VdiInfo vdi;
  try {
    vdi = ingest::vdi_by_uuid(client, a.vdi);
  } catch (const xapi::XapiError& e) {
    if (e.code() == "UUID_INVALID")
      throw UsageError("the host has no VDI " + a.vdi + "; to bring the point back as a new VDI, use restore --xapi");
    throw;
  }
  if (vdi.is_snapshot) throw UsageError("VDI " + a.vdi + " is a snapshot; give the VDI it was taken of");
  if (vdi.type == "cbt_metadata") throw UsageError("VDI " + a.vdi + " holds no data (cbt_metadata)");
  check_not_in_use(client, vdi);
  if (vdi.virtual_size < m->virtual_size)
    throw UsageError("VDI " + a.vdi + " (" + std::to_string(vdi.virtual_size) + " bytes) is smaller than point " +
                     point_name + " (" + std::to_string(m->virtual_size) + " bytes)");

  // The VDI's lock: no ingest snapshots it half rolled back, and the
  // snapshot's journal lives beside the points.
  auto lock = repo->lock_vdi(a.vdi, holder_text("cbtfs-repo rollback"));
  ingest::Options iopts;
  auto log = [](const std::string& s) { std::fprintf(stderr, "cbtfs-repo: %s\n", s.c_str()); };
  const uint64_t nblocks = block_count(vdi.virtual_size);

  // The repository's side: POINT against the latest point.
  std::vector<bool> want(nblocks, false);
  auto repo_runs = changed_blocks_between(*repo, *m, *latest);
  for (auto& r : repo_runs)
    for (uint64_t b = r.first; b < r.first + r.count && b < nblocks; ++b) want[b] = true;
  const uint64_t repo_n = block_total(repo_runs);

  // The host's side.
  std::optional<VdiInfo> snap;
  std::vector<bool> cbt;
  std::string broken;
  if (a.dry_run) {
    broken = cbt_diff(client, *latest, vdi, vdi.ref, cbt);  // to the VDI itself: nothing taken, nothing written
  } else {
    ingest::recover_interrupted_snapshot(client, repo, vdi, iopts, log);
    std::string name = "cbtfs-rollback " + (repo->id().empty() ? std::string() : repo->id().substr(0, 8) + " ") +
                       "undo " + format_iso_time(static_cast<int64_t>(std::time(nullptr))) + " (before rollback to " +
                       point_name + ")";
    snap = ingest::take_named_snapshot(client, repo, vdi, name, iopts, log);
    broken = cbt_diff(client, *latest, vdi, snap->ref, cbt);
  }
  const uint64_t cbt_n = broken.empty() ? count_set(cbt) : 0;
  for (uint64_t b = 0; broken.empty() && b < nblocks && b < cbt.size(); ++b)
    if (cbt[b]) want[b] = true;
  const uint64_t union_n = count_set(want);
  std::vector<xapi::Extent> runs = broken.empty() ? extents_of(want, vdi.virtual_size)
                                                   : std::vector<xapi::Extent>{{0, vdi.virtual_size}};
  uint64_t bytes = 0;
  for (auto& r : runs) bytes += r.length;

  std::string plan = broken.empty()
                         ? "repository diff " + blocks_text(repo_n) + ", CBT diff " + blocks_text(cbt_n) +
                               " since the latest point's snapshot, union " + blocks_text(union_n) + ": " +
                               human_bytes(bytes) + " of " + human_bytes(vdi.virtual_size)
                         : "CBT chain broken (" + broken + "): repository diff " + blocks_text(repo_n) +
                               ", full write of every byte: " + human_bytes(bytes);
  if (a.dry_run) {
    std::printf("rollback of VDI %s to %s would write %s\n", a.vdi.c_str(), point_name.c_str(), plan.c_str());
    return kExitOk;
  }

  // A VM may have started while the snapshot was taken: look again, just
  // before writing.
  try {
    check_not_in_use(client, vdi);
  } catch (...) {
    try {
      ingest::destroy_vdi(client, snap->ref);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cbtfs-repo: cannot remove the snapshot %s: %s\n", snap->uuid.c_str(), e.what());
    }
    throw;
  }

  PointReader reader(repo, m);
  try {
    Progress progress("rollback to " + point_name, bytes);
    uint64_t sent = 0;
    if (broken.empty()) {
      if (!runs.empty())
        xapi::import_raw_vdi_sparse(client, vdi.ref, runs, [&](uint64_t offset, std::span<std::byte> out) {
          size_t n = read_for_vdi(reader, m->virtual_size, offset, out);
          sent += n;
          progress.update(std::min(sent, bytes));
          return n;
        });
    } else {
      xapi::import_raw_vdi(client, vdi.ref, vdi.virtual_size, [&](uint64_t offset, std::span<std::byte> out) {
        size_t n = read_for_vdi(reader, m->virtual_size, offset, out);
        progress.update(offset + n);
        return n;
      });
    }
    progress.finish();
  } catch (...) {
    std::fprintf(stderr,
                 "cbtfs-repo: the rollback failed part way: VDI %s may hold a mix of its own blocks and point %s's. "
                 "Run the rollback again, or go back with the snapshot %s ('%s') taken before it\n",
                 a.vdi.c_str(), point_name.c_str(), snap->uuid.c_str(), printable(snap->name).c_str());
    throw;
  }
  std::printf("rolled back VDI %s to %s: wrote %s\n", a.vdi.c_str(), point_name.c_str(), plan.c_str());
  if (a.keep_undo) {
    std::printf("undo snapshot: %s ('%s')\n", snap->uuid.c_str(), printable(snap->name).c_str());
  } else {
    try {
      ingest::destroy_vdi(client, snap->ref);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cbtfs-repo: cannot remove the snapshot %s taken before the rollback: %s\n",
                   snap->uuid.c_str(), e.what());
      return kExitFailed;
    }
  }
  return kExitOk;
}

}  // namespace cbtfs
