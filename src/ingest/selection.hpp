// Which VMs of the pool a run backs up when it is not given them by name:
// --all, --tag, --exclude-vm, --exclude-tag. Knows VM records, not XAPI calls.
#pragma once

#include <string>
#include <vector>

namespace cbtfs::ingest {

// What VM.get_all_records says of a VM, as far as selection goes.
struct PoolVm {
  std::string ref, uuid, name;
  std::vector<std::string> tags;
  bool is_template = false, is_snapshot = false, is_control_domain = false;
  // Not for selection: what the backup job of a selected VM reads its
  // disks and its leftover snapshots from, without reading the VM again.
  std::vector<std::string> vbds, snapshots;  // refs
};

struct VmFilter {
  bool all = false;                       // every VM
  std::vector<std::string> tags;          // or those with any of these tags
  std::vector<std::string> exclude_vms;   // name or uuid
  std::vector<std::string> exclude_tags;  // none with any of these tags

  bool empty() const { return !all && tags.empty(); }
};

// Templates, snapshots and control domains are never selected, whatever
// the filter says: they are not VMs anyone backs up (a snapshot VM is a
// point in time already, and the control domain's disks are the host's).
bool selected(const PoolVm& vm, const VmFilter& f);

// The selected VMs of vms, by name (then uuid), so that runs and their logs
// read the same way every night.
std::vector<PoolVm> select_vms(std::vector<PoolVm> vms, const VmFilter& f);

}  // namespace cbtfs::ingest
