// cbtfs-repo copy SRC DST [VDI...]: the points of SRC that DST lacks, oldest
// first, each committed in DST on its own. Run again after an interruption,
// it goes on from DST's latest point.
#include <cstdio>
#include <exception>

#include "cbtfs/copy.hpp"
#include "cbtfs/errors.hpp"
#include "cbtfs/human_bytes.hpp"
#include "cbtfs/key_slots.hpp"
#include "cbtfs/open_storage.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

int cmd_copy(const CopyArgs& a) {
  auto src = open_repository(a.src);
  std::shared_ptr<Repository> dst;
  try {
    if (a.dst_passphrase_file.empty() && a.dst_key_file.empty()) {
      dst = open_repository(a.dst);
    } else {
      auto keys = [&] { return std::vector<Unlocker>{read_unlocker(a.dst_passphrase_file, a.dst_key_file)}; };
      dst = Repository::open(open_storage(a.dst), keys);
    }
  } catch (const KeyError&) {
    throw;
  } catch (const std::exception&) {
    std::fprintf(stderr, "cbtfs-repo copy: DST must be a repository: create it first with "
                         "'cbtfs-repo init --format 2 %s'\n", a.dst.c_str());
    throw;
  }
  if (src->id() == dst->id()) throw UsageError("SRC and DST are the same repository");
  std::vector<std::string> vdis = a.vdis;
  if (vdis.empty()) vdis = src->vdis();
  for (auto& v : vdis)
    if (!src->has_vdi(v)) throw UsageError("no VDI " + v + " in " + a.src);

  std::string holder = holder_text("cbtfs-repo copy");
  int rc = kExitOk;
  uint64_t points = 0, read = 0, stored = 0;
  for (auto& vdi : vdis) {
    CopyPlan plan = plan_copy(*src, *dst, vdi);
    if (plan.points.empty()) {
      if (!a.quiet) std::printf("%s: nothing to copy (%zu point(s) there already)\n", vdi.c_str(), plan.already);
      continue;
    }
    ManifestPtr base = plan.base;
    for (auto& p : plan.points) {
      std::string name = vdi + "/" + format_point_name(p->time);
      if (a.dry_run) {
        std::printf("would copy %s%s\n", name.c_str(), base ? "" : " (every block read)");
        base = p;
        continue;
      }
      try {
        std::optional<Progress> bar;
        if (!a.quiet) bar.emplace("copy " + format_point_name(p->time), 0);
        CopiedPoint c = copy_point(src, p, base, dst, holder, [&](uint64_t done, uint64_t total) {
          if (!bar) return;
          bar->set_total(total);
          bar->update(done);
        });
        if (bar) bar->finish();
        ++points;
        read += c.bytes_read;
        stored += c.bytes_stored;
        if (!a.quiet)
          std::printf("copied %s: %s read, %s stored\n", name.c_str(), human_bytes(c.bytes_read).c_str(),
                      human_bytes(c.bytes_stored).c_str());
        base = p;
      } catch (const LockedError& e) {
        std::fprintf(stderr, "cbtfs-repo copy: %s: %s; its points were not copied\n", vdi.c_str(), e.what());
        rc = kExitFailed;
        break;
      } catch (const CorruptError& e) {
        // DST keeps what was committed before; the rest of this VDI waits
        // for a repaired source.
        std::fprintf(stderr, "cbtfs-repo copy: %s: damaged in SRC: %s; this point and the later ones were not copied\n",
                     name.c_str(), e.what());
        rc = kExitFailed;
        break;
      }
    }
  }
  if (points) merge_index_after_writing(*dst, "cbtfs-repo copy");
  if (!a.dry_run && !a.quiet)
    std::printf("%llu point(s) copied: %s read, %s stored\n", static_cast<unsigned long long>(points),
                human_bytes(read).c_str(), human_bytes(stored).c_str());
  return rc;
}

}  // namespace cbtfs
