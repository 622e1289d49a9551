// cbtfs-repo verify: reads and checks everything; exit 1 names what is bad.
// --stored-only: what can be checked without the key.
#include <cstdio>
#include <string>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/verify.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

int cmd_verify(const std::string& path, const std::string& only) {
  std::shared_ptr<Repository> repo;
  try {
    repo = open_repository(path);
  } catch (const KeyError& e) {
    throw KeyError(std::string(e.what()) + "; without the key, 'cbtfs-repo verify --stored-only' checks what is stored");
  }
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

int cmd_verify_stored(const std::string& path, const std::string& only) {
  if (!only.empty()) throw UsageError("--stored-only checks the whole repository: its records are shared by every VDI");
  auto repo = open_repository(path, false);
  if (repo->format() < 2) {
    std::printf("format 1 keeps no stored checksums apart and is never encrypted: verifying everything\n");
    return cmd_verify(path, only);
  }
  Progress progress("verify stored", 0);
  auto r = verify_stored(*repo, [&](uint64_t done) { progress.update(done); });
  progress.finish();
  for (auto& w : r.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  for (auto& p : r.problems) std::printf("DAMAGED: %s\n", p.c_str());
  if (r.unframed)
    std::printf("%llu manifest(s) have no stored checksum (sealed before cbtfs kept one, or damaged in their first "
                "bytes): only verify with the key checks them\n",
                static_cast<unsigned long long>(r.unframed));
  if (r.unrecorded)
    std::printf("%llu record(s) were stored before stored checksums existed: found, not checked\n",
                static_cast<unsigned long long>(r.unrecorded));
  std::printf("%s: %llu manifest(s), %llu index segment(s), %llu pack(s), %llu record(s), %s checked as stored: "
              "%llu problem(s)%s\n",
              r.problems.empty() ? "verify OK" : "verify FAILED", static_cast<unsigned long long>(r.manifests),
              static_cast<unsigned long long>(r.segments), static_cast<unsigned long long>(r.packs),
              static_cast<unsigned long long>(r.records), human_bytes(r.bytes_read).c_str(),
              static_cast<unsigned long long>(r.problems.size()),
              repo->encrypted() ? " (nothing decrypted: the plaintext is checked by verify with the key)" : "");
  return r.problems.empty() ? kExitOk : kExitFailed;
}

}  // namespace cbtfs
