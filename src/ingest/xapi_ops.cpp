#include "xapi_ops.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>

#include "cbtfs/format.hpp"

namespace cbtfs::ingest {

using xapi::Value;

namespace {
constexpr const char* kNullRef = "OpaqueRef:NULL";

bool truthy(const Value& rec, const char* key) { return rec.has(key) && rec.at(key).to_bool(); }
std::string text(const Value& rec, const char* key) { return rec.has(key) ? rec.at(key).str() : std::string(); }

// XAPI's dateTime.iso8601: "20261125T11:40:23Z" (UTC); 0 when unreadable.
int64_t xapi_time(const std::string& s) {
  std::tm tm{};
  char z = 0;
  if (std::sscanf(s.c_str(), "%4d%2d%2dT%2d:%2d:%2d%c", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
                  &tm.tm_sec, &z) < 6)
    return 0;
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  return static_cast<int64_t>(timegm(&tm));
}
}  // namespace

VdiInfo get_vdi(xapi::Client& c, const std::string& ref) { return vdi_from_record(ref, c.call("VDI.get_record", {Value(ref)})); }

VdiInfo vdi_from_record(const std::string& ref, const Value& r) {
  VdiInfo v;
  v.ref = ref;
  v.uuid = r.at("uuid").str();
  v.name = text(r, "name_label");
  v.virtual_size = static_cast<uint64_t>(r.at("virtual_size").to_int());
  v.type = text(r, "type");
  v.cbt_enabled = truthy(r, "cbt_enabled");
  v.is_snapshot = truthy(r, "is_a_snapshot");
  v.snapshot_of = text(r, "snapshot_of");
  if (v.is_snapshot) v.snapshot_time = xapi_time(text(r, "snapshot_time"));
  if (r.has("VBDs"))
    for (auto& b : r.at("VBDs").array()) v.vbds.push_back(b.str());
  if (r.has("snapshots"))
    for (auto& s : r.at("snapshots").array()) v.snapshots.push_back(s.str());
  return v;
}

std::map<std::string, Value> records_where(xapi::Client& c, const std::string& cls, const std::string& expr) {
  return c.call(cls + ".get_all_records_where", {Value(expr)}).fields();
}

std::string field_is(const std::string& field, const std::string& value) {
  if (value.find('"') != std::string::npos)
    throw std::invalid_argument("a XAPI filter cannot compare with a value holding '\"': " + value);
  return "field \"" + field + "\" = \"" + value + "\"";
}

VdiInfo vdi_by_uuid(xapi::Client& c, const std::string& uuid) {
  return get_vdi(c, c.call("VDI.get_by_uuid", {Value(uuid)}).str());
}

namespace {
VmInfo vm_from_record(xapi::Client& c, const std::string& ref, const Value& r, bool disks) {
  VmInfo vm;
  vm.ref = ref;
  vm.uuid = r.at("uuid").str();
  vm.name = text(r, "name_label");
  for (auto& vbd : r.at("VBDs").array()) vm.vbds.push_back(vbd.str());
  if (r.has("snapshots"))
    for (auto& s : r.at("snapshots").array()) vm.snapshots.push_back(s.str());
  if (disks) load_disks(c, vm);
  return vm;
}

bool backed_up_kind(const Value& rec) {
  return !truthy(rec, "is_a_snapshot") && !truthy(rec, "is_a_template") && !truthy(rec, "is_control_domain");
}
}  // namespace

void load_disks(xapi::Client& c, VmInfo& vm, std::map<std::string, std::vector<VdiInfo>>* snapshots) {
  vm.disks.clear();
  auto vbds = records_where(c, "VBD", field_is("VM", vm.ref));
  std::vector<std::string> order = vm.vbds;
  if (order.empty()) {
    std::vector<std::pair<std::string, std::string>> by_device;  // (userdevice, ref)
    for (auto& [ref, vbd] : vbds) by_device.emplace_back(text(vbd, "userdevice"), ref);
    std::sort(by_device.begin(), by_device.end(), [](auto& a, auto& b) {
      return a.first.size() != b.first.size() ? a.first.size() < b.first.size() : a < b;  // "2" before "10"
    });
    for (auto& d : by_device) order.push_back(d.second);
  }
  std::vector<std::string> refs;  // the disks' VDIs, in order
  for (auto& vbd_ref : order) {
    auto it = vbds.find(vbd_ref);
    if (it == vbds.end()) throw xapi::XapiError("VBD.get_all_records_where", {"HANDLE_INVALID", "VBD", vbd_ref});
    const Value& vbd = it->second;
    if (text(vbd, "type") != "Disk" || truthy(vbd, "empty")) continue;
    std::string vdi = text(vbd, "VDI");
    if (vdi.empty() || vdi == kNullRef) continue;
    refs.push_back(vdi);
  }
  if (refs.empty()) return;
  std::string expr;
  for (auto& r : refs) {
    expr += (expr.empty() ? "" : " or ") + field_is("_ref", r);
    if (snapshots) expr += " or " + field_is("snapshot_of", r);
  }
  auto vdis = records_where(c, "VDI", expr);
  for (auto& r : refs) {
    auto it = vdis.find(r);
    if (it == vdis.end()) throw xapi::XapiError("VDI.get_all_records_where", {"HANDLE_INVALID", "VDI", r});
    vm.disks.push_back(vdi_from_record(r, it->second));
  }
  if (snapshots) {
    for (auto& [ref, rec] : vdis) {
      if (!truthy(rec, "is_a_snapshot")) continue;
      std::string of = text(rec, "snapshot_of");
      if (std::find(refs.begin(), refs.end(), of) != refs.end()) (*snapshots)[of].push_back(vdi_from_record(ref, rec));
    }
  }
}

VmInfo get_vm(xapi::Client& c, const std::string& ref, bool disks) {
  return vm_from_record(c, ref, c.call("VM.get_record", {Value(ref)}), disks);
}

VmInfo find_vm(xapi::Client& c, const std::string& key) {
  if (is_uuid(key)) {
    std::string ref = c.call("VM.get_by_uuid", {Value(key)}).str();
    Value rec = c.call("VM.get_record", {Value(ref)});
    if (!backed_up_kind(rec))
      throw std::runtime_error("VM " + key + " is a snapshot, a template or the control domain");
    return vm_from_record(c, ref, rec, false);
  }
  std::vector<std::pair<std::string, Value>> vms;
  if (key.find('"') == std::string::npos) {  // one call
    for (auto& [ref, rec] : records_where(c, "VM", field_is("name__label", key)))
      if (backed_up_kind(rec)) vms.emplace_back(ref, rec);
  } else {
    for (auto& r : c.call("VM.get_by_name_label", {Value(key)}).array()) {
      Value rec = c.call("VM.get_record", {r});
      if (backed_up_kind(rec)) vms.emplace_back(r.str(), std::move(rec));
    }
  }
  if (vms.empty()) throw std::runtime_error("no VM named '" + key + "'");
  if (vms.size() > 1) throw std::runtime_error(std::to_string(vms.size()) + " VMs are named '" + key + "'; give its uuid");
  return vm_from_record(c, vms[0].first, vms[0].second, false);
}

std::vector<PoolVm> pool_vms(xapi::Client& c) {
  std::vector<PoolVm> out;
  Value all = c.call("VM.get_all_records");
  for (auto& [ref, r] : all.fields()) {
    PoolVm vm;
    vm.ref = ref;
    vm.uuid = text(r, "uuid");
    vm.name = text(r, "name_label");
    if (r.has("tags"))
      for (auto& t : r.at("tags").array()) vm.tags.push_back(t.str());
    vm.is_template = truthy(r, "is_a_template");
    vm.is_snapshot = truthy(r, "is_a_snapshot");
    vm.is_control_domain = truthy(r, "is_control_domain");
    if (r.has("VBDs"))
      for (auto& b : r.at("VBDs").array()) vm.vbds.push_back(b.str());
    if (r.has("snapshots"))
      for (auto& s : r.at("snapshots").array()) vm.snapshots.push_back(s.str());
    out.push_back(std::move(vm));
  }
  return out;
}

std::string enable_cbt_if_possible(xapi::Client& c, const VdiInfo& disk) {
  if (disk.cbt_enabled) return "";
  try {
    c.call("VDI.enable_cbt", {Value(disk.ref)});
    return "";
  } catch (const xapi::XapiError& e) {
    static const char* const cannot[] = {"SR_OPERATION_NOT_SUPPORTED", "VDI_INCOMPATIBLE_TYPE", "LICENCE_RESTRICTION",
                                         "MESSAGE_METHOD_UNKNOWN", "OPERATION_NOT_ALLOWED"};
    for (const char* code : cannot)
      if (e.code() == code) return e.what();
    throw;
  }
}

std::vector<Dom0Attachment> dom0_attachments(xapi::Client& c, const VdiInfo& disk) {
  std::vector<Dom0Attachment> out;
  for (auto& ref : disk.vbds) {
    try {
      Value vbd = c.call("VBD.get_record", {Value(ref)});
      std::string vm = text(vbd, "VM");
      if (vm.empty() || vm == kNullRef) continue;
      Value r = c.call("VM.get_record", {Value(vm)});
      if (!truthy(r, "is_control_domain")) continue;
      out.push_back({text(vbd, "uuid"), text(r, "name_label"), truthy(vbd, "currently_attached")});
    } catch (const xapi::XapiError& e) {
      if (e.code() != "HANDLE_INVALID") throw;  // gone meanwhile
    }
  }
  return out;
}

std::pair<std::string, std::string> vm_of(xapi::Client& c, const VdiInfo& vdi) {
  for (auto& vbd_ref : vdi.vbds) {
    Value vbd = c.call("VBD.get_record", {Value(vbd_ref)});
    std::string vm = text(vbd, "VM");
    if (vm.empty() || vm == kNullRef) continue;
    Value r = c.call("VM.get_record", {Value(vm)});
    if (truthy(r, "is_control_domain") || truthy(r, "is_a_snapshot")) continue;
    return {text(r, "name_label"), text(r, "uuid")};
  }
  return {};
}

std::vector<std::string> leftover_snapshot_vms(xapi::Client& c, const VmInfo& vm, const std::string& prefix) {
  std::vector<std::string> out;
  for (auto& ref : vm.snapshots) {
    try {
      Value s = c.call("VM.get_record", {Value(ref)});
      if (text(s, "name_label").rfind(prefix, 0) == 0) out.push_back(ref);
    } catch (const xapi::XapiError& e) {
      if (e.code() != "HANDLE_INVALID") throw;  // gone meanwhile
    }
  }
  return out;
}

VmInfo snapshot_vm(xapi::Client& c, const VmInfo& vm, const std::string& name) {
  VmInfo snap;
  snap.ref = c.call("VM.snapshot", {Value(vm.ref), Value(name)}).str();
  snap.name = name;
  load_disks(c, snap);
  return snap;
}

std::string start_snapshot_vdi(xapi::Client& c, const VdiInfo& vdi) {
  return c.call("Async.VDI.snapshot", {Value(vdi.ref), Value(std::map<std::string, Value>{})}).str();
}

std::vector<nbd::Target> nbd_targets(xapi::Client& c, const VdiInfo& snap) {
  std::vector<nbd::Target> out;
  Value infos = c.call("VDI.get_nbd_info", {Value(snap.ref)});  // named: the loop below borrows from it
  for (auto& r : infos.array())
    out.push_back({r.at("address").str(), r.at("port").str(), r.at("exportname").str(), text(r, "cert"), text(r, "subject")});
  return out;
}

namespace {
// VDI_IN_USE is transient here: the host is still unplugging a VBD (its own
// NBD server's, or the snapshot VM's we just removed). Retries for about 45 s.
template <class F>
auto retry_in_use(F&& f) {
  for (int attempt = 0;; ++attempt) {
    try {
      return f();
    } catch (const xapi::XapiError& e) {
      if (e.code() != "VDI_IN_USE" || attempt >= 10) throw;
      std::this_thread::sleep_for(std::chrono::seconds(attempt < 3 ? 1 : 5));
    }
  }
}
}  // namespace

std::string list_changed_blocks(xapi::Client& c, const std::string& from_ref, const std::string& to_ref) {
  return retry_in_use([&] { return c.call("VDI.list_changed_blocks", {Value(from_ref), Value(to_ref)}).str(); });
}

// Safe to repeat once we have looked: when the answer was lost, the VDI
// may already be metadata-only, and then it is done.
void data_destroy(xapi::Client& c, const std::string& ref) {
  for (int attempt = 0;; ++attempt) {
    try {
      retry_in_use([&] { c.call("VDI.data_destroy", {Value(ref)}); });
      return;
    } catch (const xapi::XapiError&) {
      throw;
    } catch (const std::runtime_error&) {  // no answer, or a garbled one
      if (attempt >= 2) throw;
      std::this_thread::sleep_for(std::chrono::seconds(1 << attempt));
      if (get_vdi(c, ref).type == "cbt_metadata") return;
    }
  }
}

void destroy_vdi(xapi::Client& c, const std::string& ref) {
  try {
    retry_in_use([&] { c.call("VDI.destroy", {Value(ref)}); });
  } catch (const xapi::XapiError& e) {
    if (e.code() != "HANDLE_INVALID") throw;  // already gone
  }
}

void destroy_snapshot_vm(xapi::Client& c, const std::string& ref) { c.call("VM.destroy", {Value(ref)}); }

}  // namespace cbtfs::ingest
