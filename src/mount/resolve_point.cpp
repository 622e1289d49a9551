#include "resolve_point.hpp"

#include "cbtfs/errors.hpp"

namespace cbtfs {

ResolvedPoint resolve_point(MountView& view, const std::string& vdi_arg, const std::string& point_arg) {
  ResolvedPoint r;
  std::string vdi = vdi_arg;
  while (vdi.size() > 1 && vdi.back() == '/') vdi.pop_back();
  if (vdi.find('/') != std::string::npos) {
    // VM/VDI, as the mount shows them under by-name/.
    auto e = view.lookup("/by-name/" + vdi);
    if (!e || e->kind != ViewEntry::Kind::Link || !e->target.starts_with("../../"))
      throw UsageError("no VDI named " + vdi + " (VM/VDI as under by-name/ of the mount; see cbtfs-repo ls)");
    r.vdi = e->target.substr(6);
  } else {
    auto e = view.lookup("/" + vdi);
    if (vdi.empty() || vdi == "by-name" || !e || e->kind != ViewEntry::Kind::Dir)
      throw UsageError("no VDI " + vdi + " in the repository (give its uuid, or VM/VDI; see cbtfs-repo ls)");
    r.vdi = vdi;
  }

  std::string point = point_arg.empty() ? "latest" : point_arg;
  if (point.ends_with(".raw")) point.resize(point.size() - 4);
  std::string image;
  if (point == "latest") {
    auto e = view.lookup("/" + r.vdi + "/latest.raw");
    if (!e || e->kind != ViewEntry::Kind::Link) throw UsageError("VDI " + r.vdi + " has no point");
    image = e->target;
  } else {
    image = point + ".raw";
  }
  // Only a whole disk image: not a partition or LV file of it.
  auto e = view.lookup("/" + r.vdi + "/" + image);
  if (!e || e->kind != ViewEntry::Kind::Image || !e->point || e->partition != 0 || e->lv)
    throw UsageError("VDI " + r.vdi + " has no point " + point + " (see cbtfs-repo ls)");
  r.point = image.substr(0, image.size() - 4);
  r.manifest = e->point;
  if (!e->point->vm_name.empty() || !e->point->vdi_name.empty())
    r.label = (e->point->vm_name.empty() ? "_no-vm" : e->point->vm_name) + "/" + e->point->vdi_name;
  return r;
}

}  // namespace cbtfs
