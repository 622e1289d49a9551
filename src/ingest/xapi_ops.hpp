// The XAPI calls a backup run makes, typed. Knows XAPI, not the repository.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "nbd/nbd_reader.hpp"
#include "selection.hpp"
#include "xapi/client.hpp"
#include "xapi/tasks.hpp"

namespace cbtfs::ingest {

struct VdiInfo {
  std::string ref, uuid, name;
  uint64_t virtual_size = 0;
  std::string type;  // user, system, cbt_metadata, ...
  bool cbt_enabled = false;
  bool is_snapshot = false;
  std::string snapshot_of;  // ref
  int64_t snapshot_time = 0;  // seconds since the epoch; 0 when not a snapshot
  std::vector<std::string> vbds;  // refs
  std::vector<std::string> snapshots;  // refs of the snapshots taken of it, as the record listed them
};

// A VBD by which a control domain holds a disk.
struct Dom0Attachment {
  std::string vbd_uuid, vm_name;
  bool plugged = false;
};

struct VmInfo {
  std::string ref, uuid, name;
  std::vector<std::string> vbds;       // refs, as the record listed them
  std::vector<std::string> snapshots;  // refs of its snapshot VMs, as the record listed them
  std::vector<VdiInfo> disks;  // Disk VBDs with a VDI (CDs and empty drives skipped); see load_disks
};

VdiInfo get_vdi(xapi::Client& c, const std::string& ref);
VdiInfo vdi_from_record(const std::string& ref, const xapi::Value& record);
// The records of class cls (VM, VBD, VDI) that match a filter of XAPI's
// database (get_all_records_where, one call whatever the pool's size):
// `field "VM" = "OpaqueRef:..."`, joined by and/or. field_is builds one
// comparison; the literal may not hold a double quote (the language has no
// escape).
std::map<std::string, xapi::Value> records_where(xapi::Client& c, const std::string& cls, const std::string& expr);
std::string field_is(const std::string& field, const std::string& value);
VdiInfo vdi_by_uuid(xapi::Client& c, const std::string& uuid);
// A VM by uuid or by name label (which must be unique), without its disks.
VmInfo find_vm(xapi::Client& c, const std::string& uuid_or_name);
// The VM's record, with its disks unless disks is false (see load_disks:
// a backup job loads them, selection need not).
VmInfo get_vm(xapi::Client& c, const std::string& ref, bool disks = true);
// Fills vm.disks, in the order of vm.vbds (of the userdevices when the
// record was not read), with two calls: the VM's VBDs, then their VDIs.
// With snapshots, the second call also brings the records of every
// snapshot of those disks, by the disk's ref.
void load_disks(xapi::Client& c, VmInfo& vm, std::map<std::string, std::vector<VdiInfo>>* snapshots = nullptr);

// Every VM record of the pool (one call), for selection.
std::vector<PoolVm> pool_vms(xapi::Client& c);
// "" when disk has changed block tracking, or the host agreed to turn it on
// now; else why it cannot have it (its SR type, its VDI type, the licence,
// a host without CBT), in the host's words. Other failures throw.
std::string enable_cbt_if_possible(xapi::Client& c, const VdiInfo& disk);

// The VBDs of disk that belong to a control domain. xapi-nbd plugs one into
// dom0 for each NBD connection and unplugs it when the connection ends; one
// still there is what a transfer cut off in a bad moment leaves (or another
// tool reading the disk now). It keeps the disk in use: it cannot be
// destroyed nor made metadata-only.
std::vector<Dom0Attachment> dom0_attachments(xapi::Client& c, const VdiInfo& disk);

// The VM a disk is attached to (name, uuid), or empty strings.
std::pair<std::string, std::string> vm_of(xapi::Client& c, const VdiInfo& vdi);
// Snapshot VM records of vm (of those its record listed) whose name starts
// with prefix.
std::vector<std::string> leftover_snapshot_vms(xapi::Client& c, const VmInfo& vm, const std::string& prefix);

// Snapshots the whole VM (a crash-consistent set); returns the snapshot VM
// (its ref, name and disks).
VmInfo snapshot_vm(xapi::Client& c, const VmInfo& vm, const std::string& name);
// VDI.snapshot cannot name its snapshot, so it is taken as a task
// (Async.VDI.snapshot): the task's ref is known before the snapshot exists,
// and the host keeps the task's result for a while after it ends. A run
// that loses the answer, or dies waiting, can read back exactly what it took.
std::string start_snapshot_vdi(xapi::Client& c, const VdiInfo& vdi);

std::vector<nbd::Target> nbd_targets(xapi::Client& c, const VdiInfo& snap);
// These three retry VDI_IN_USE for a while: the host may still be
// unplugging a VBD.
std::string list_changed_blocks(xapi::Client& c, const std::string& from_ref, const std::string& to_ref);
void data_destroy(xapi::Client& c, const std::string& ref);
void destroy_vdi(xapi::Client& c, const std::string& ref);
void destroy_snapshot_vm(xapi::Client& c, const std::string& ref);

}  // namespace cbtfs::ingest
