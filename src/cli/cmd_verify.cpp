// cbtfs-repo verify: reads and checks everything; exit 1 names what is bad.
#include <cstdio>
#include <string>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/verify.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

int cmd_verify(const std::string& path, const std::string& only) {
  auto repo = open_repository(path);
  uint64_t problems = 0, points = 0, blocks = 0, bytes = 0, nvdis = 0;
  for (auto& vdi : repo->vdis()) {
    if (!only.empty() && vdi != only) continue;
    ++nvdis;
    Progress progress("verify " + vdi.substr(0, 8), 0);
    auto r = verify_vdi(*repo, vdi, [&](uint64_t done) { progress.update(done); });
    progress.finish();
    for (auto& w : r.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
    for (auto& p : r.problems) std::printf("DAMAGED: %s\n", p.c_str());
    problems += r.problems.size();
    points += r.points;
    blocks += r.blocks;
    bytes += r.bytes_read;
  }
  if (!only.empty() && nvdis == 0) throw UsageError("no VDI " + only + " in " + path);
  std::printf("%s: %llu VDI(s), %llu point(s), %llu blocks, %s checked: %llu problem(s)\n",
              problems ? "verify FAILED" : "verify OK", static_cast<unsigned long long>(nvdis),
              static_cast<unsigned long long>(points), static_cast<unsigned long long>(blocks), human_bytes(bytes).c_str(),
              static_cast<unsigned long long>(problems));
  return problems ? kExitFailed : kExitOk;
}

}  // namespace cbtfs
