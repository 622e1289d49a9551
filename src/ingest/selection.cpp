#include "selection.hpp"

#include <algorithm>

namespace cbtfs::ingest {

namespace {
bool has_any(const std::vector<std::string>& have, const std::vector<std::string>& wanted) {
  return std::any_of(wanted.begin(), wanted.end(),
                     [&](const std::string& t) { return std::find(have.begin(), have.end(), t) != have.end(); });
}
}  // namespace

bool selected(const PoolVm& vm, const VmFilter& f) {
  if (vm.is_template || vm.is_snapshot || vm.is_control_domain) return false;
  if (!f.all && !has_any(vm.tags, f.tags)) return false;
  for (auto& x : f.exclude_vms)
    if (x == vm.name || x == vm.uuid) return false;
  return !has_any(vm.tags, f.exclude_tags);
}

std::vector<PoolVm> select_vms(std::vector<PoolVm> vms, const VmFilter& f) {
  std::erase_if(vms, [&](const PoolVm& vm) { return !selected(vm, f); });
  std::sort(vms.begin(), vms.end(),
            [](const PoolVm& a, const PoolVm& b) { return a.name != b.name ? a.name < b.name : a.uuid < b.uuid; });
  return vms;
}

}  // namespace cbtfs::ingest
