// cbtfs-repo restore --xapi URL --sr SR REPO VDI POINT: a point back to
// XenServer as a new VDI. The VDI is created at the point's size and, the
// new VDI reading as zeros, only the point's allocated blocks are sent, in
// runs (XAPI's chunked raw import, xapi/vdi_import); with --no-sparse every
// byte goes, zeros too. Checksums are verified on the way; a VDI whose upload
// failed is destroyed, so none is left half filled.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <span>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/point_reader.hpp"
#include "commands.hpp"
#include "progress.hpp"
#include "text.hpp"
#include "xapi/client.hpp"
#include "xapi/vdi_import.hpp"

namespace cbtfs {

size_t read_for_vdi(PointReader& reader, uint64_t image_size, uint64_t offset, std::span<std::byte> out) {
  if (offset >= image_size) {
    std::memset(out.data(), 0, out.size());
    return out.size();
  }
  size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), image_size - offset));
  try {
    return reader.read(offset, out.first(n));
  } catch (const std::exception& e) {
    throw CorruptError(e.what());
  }
}


int cmd_restore_xapi(const RestoreXapiArgs& a) {
  auto repo = open_repository(a.repo);
  ManifestPtr m = find_point(*repo, a.vdi, a.point);
  auto hold = repo->hold_point(*m);  // a prune meanwhile keeps the point until we are done
  if (!hold) throw UsageError("point " + format_point_name(m->time) + " of VDI " + a.vdi + " was just removed");
  xapi::Client client(a.xapi);
  client.login();
  std::string name = a.name.empty() ? (m->vdi_name.empty() ? "restored" : m->vdi_name) + " (restored " +
                                          format_iso_time(m->time) + ")"
                                    : a.name;
  std::string ref = xapi::create_vdi(
      client, {a.sr, name, "restored by cbtfs-repo from VDI " + a.vdi + ", point " + format_iso_time(m->time),
               m->virtual_size});
  try {
    std::string what;  // the summary's account of the upload
    xapi::VdiRecord vdi = xapi::get_vdi_record(client, ref);
    if (vdi.virtual_size < m->virtual_size) throw StorageError("the host made the VDI smaller than the point", EIO);
    PointReader reader(repo, m);
    uint64_t sent = 0;  // data bytes read for the upload: the progress line's count
    if (a.sparse) {
      std::vector<xapi::Extent> runs;
      for (auto& e : reader.data_extents()) runs.push_back({e.offset, e.length});
      uint64_t allocated = 0;
      for (const auto& r : runs) allocated += r.length;
      Progress progress("restore " + format_point_name(m->time) + " (allocated data)", allocated);
      xapi::import_raw_vdi_sparse(client, ref, runs, [&](uint64_t offset, std::span<std::byte> out) {
        size_t n = read_for_vdi(reader, m->virtual_size, offset, out);
        sent += n;
        progress.update(std::min(sent, allocated));  // a 302 may make it go twice
        return n;
      });
      progress.finish();
      what = human_bytes(allocated) + " of data in " + human_bytes(vdi.virtual_size);
    } else {
      Progress progress("restore " + format_point_name(m->time), vdi.virtual_size);
      xapi::import_raw_vdi(client, ref, vdi.virtual_size, [&](uint64_t offset, std::span<std::byte> out) {
        size_t n = read_for_vdi(reader, m->virtual_size, offset, out);
        progress.update(offset + n);
        return n;
      });
      progress.finish();
      what = human_bytes(vdi.virtual_size) + ", every byte sent";
    }
    std::printf("%s\n", vdi.uuid.c_str());
    std::fprintf(stderr, "cbtfs-repo: restored %s of VDI %s as VDI %s ('%s', %s) in SR %s\n",
                 format_point_name(m->time).c_str(), a.vdi.c_str(), vdi.uuid.c_str(), printable(name).c_str(),
                 what.c_str(), a.sr.c_str());
  } catch (...) {
    try {
      xapi::destroy_vdi(client, ref);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cbtfs-repo: cannot remove the half-restored VDI %s: %s\n", ref.c_str(), e.what());
    }
    throw;
  }
  return kExitOk;
}

}  // namespace cbtfs
