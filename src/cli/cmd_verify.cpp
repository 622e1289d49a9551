// cbtfs-repo verify: reads and checks everything; exit 1 names what is bad.
#include <dirent.h>
#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/s3_storage.hpp"
#include "cbtfs/verify.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

namespace {

// A local repository's writer names its unfinished files
// ".tmp.<name>.<pid>.<random>" (storage/local_storage.cpp) and removes them
// when it stops, even on SIGTERM; a killed one leaves them until the next
// writer of the VDI. Storage::list hides them, so they are looked for here.
bool writer_alive(const std::string& tmp_name) {
  auto end = tmp_name.rfind('.');
  auto start = end == std::string::npos ? end : tmp_name.rfind('.', end - 1);
  if (start == std::string::npos) return false;
  long pid = std::strtol(tmp_name.c_str() + start + 1, nullptr, 10);
  // A writer running now (an import next to this verify) is not a leftover.
  return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

size_t leftover_temporaries(const std::string& root, const std::string& vdi) {
  size_t n = 0;
  for (const char* dir : {"/packs", "/points"}) {
    DIR* d = ::opendir((root + "/vdis/" + vdi + dir).c_str());
    if (!d) continue;
    while (const dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      n += name.rfind(".tmp.", 0) == 0 && !writer_alive(name);
    }
    ::closedir(d);
  }
  return n;
}

}  // namespace

int cmd_verify(const std::string& path, const std::string& only) {
  auto repo = open_repository(path);
  uint64_t problems = 0, points = 0, blocks = 0, bytes = 0, nvdis = 0;
  for (auto& vdi : repo->vdis()) {
    if (!only.empty() && vdi != only) continue;
    ++nvdis;
    Progress progress("verify " + vdi.substr(0, 8), 0);
    auto r = verify_vdi(*repo, vdi, [&](uint64_t done) { progress.update(done); });
    progress.finish();
    if (!is_s3_url(path))
      if (size_t n = leftover_temporaries(path, vdi))
        r.warnings.push_back("VDI " + vdi + ": " + std::to_string(n) +
                             " unfinished temporary file(s) left by an interrupted writer; the next writer of that "
                             "VDI removes them");
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
