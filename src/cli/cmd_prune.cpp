// cbtfs-repo prune / forget.
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <optional>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/gc.hpp"
#include "cbtfs/parallel.hpp"
#include "cbtfs/prune.hpp"
#include "commands.hpp"
#include "progress.hpp"

namespace cbtfs {

namespace {

// Format 2: what prune or forget left unreferenced is freed by a collection
// of the whole store, run right after.
void collect_and_say(Repository& repo, bool dry_run, const char* program) {
  GcReport g = collect_store(repo, dry_run, holder_text(program));
  std::printf("store: %llu pack(s), %llu removed, %s %s", static_cast<unsigned long long>(g.packs),
              static_cast<unsigned long long>(g.packs_removed), human_bytes(g.bytes_freed).c_str(),
              dry_run ? "would be freed" : "freed");
  if (g.packs_rewritten)
    std::printf(", %llu pack(s) %s without their dead records (%s copied)",
                static_cast<unsigned long long>(g.packs_rewritten), dry_run ? "would be rewritten" : "rewritten",
                human_bytes(g.bytes_rewritten).c_str());
  if (g.bytes_dead)
    std::printf(" (%s no longer needed stays allocated: pieces of file-system blocks, or packs of an object store "
                "not yet worth rewriting)",
                human_bytes(g.bytes_dead).c_str());
  if (g.unfinished_dropped)
    std::printf("; %llu unfinished file(s) of backups that died %s", static_cast<unsigned long long>(g.unfinished_dropped),
                dry_run ? "would be removed" : "removed");
  if (g.packs_in_use)
    std::printf("; %llu pack(s) a running backup relies on are left for a later collection",
                static_cast<unsigned long long>(g.packs_in_use));
  std::printf("\n");
}

}  // namespace

int cmd_prune(const PruneArgs& a) {
  RetentionPolicy p{a.last, a.hourly, a.daily, a.weekly, a.monthly, a.yearly};
  if (!p.any()) throw UsageError("no retention rule given: say what to keep (--keep-last N, --keep-daily N, ...)");
  auto repo = open_repository(a.repo);
  auto vdis = repo->vdis();
  if (!a.vdi.empty()) {
    if (!repo->has_vdi(a.vdi)) throw UsageError("no VDI " + a.vdi + " in " + a.repo);
    vdis = {a.vdi};
  }
  uint64_t removed = 0, freed = 0, dead = 0;
  bool not_collected = false;
  // VDIs are pruned independently (each under its own lock), several at a
  // time where requests take a round trip; what was done is said in order,
  // also when one of them failed.
  std::vector<std::optional<PruneReport>> reports(vdis.size());
  std::exception_ptr failure;
  try {
    parallel_for(vdis.size(), repo->storage().parallelism(), [&](size_t i) {
      if (repo->has_vdi(vdis[i])) reports[i] = prune_vdi(repo, vdis[i], p, a.dry_run, holder_text("cbtfs-repo prune"));
    });
  } catch (...) {
    failure = std::current_exception();
  }
  for (size_t i = 0; i < vdis.size(); ++i) {
    if (!reports[i]) continue;
    const PruneReport& r = *reports[i];
    const std::string& vdi = vdis[i];
    for (auto& n : r.removed) std::printf("%s %s/%s\n", a.dry_run ? "would remove" : "removed", vdi.c_str(), n.c_str());
    for (auto& n : r.in_use)
      std::printf("kept, in use: %s/%s (open by a reader; a later prune removes it)\n", vdi.c_str(), n.c_str());
    removed += r.removed.size();
    freed += r.bytes_freed;
    dead += r.bytes_dead;
    not_collected = not_collected || r.store_not_collected;
  }
  if (failure) std::rethrow_exception(failure);
  std::printf("%s %llu point(s), %s %s", a.dry_run ? "would remove" : "removed",
              static_cast<unsigned long long>(removed), human_bytes(freed).c_str(), a.dry_run ? "would be freed" : "freed");
  if (dead)
    std::printf(" (%s no longer needed stays allocated: pieces of file-system blocks that remaining points "
                "share, or a storage that cannot free ranges of an object)",
                human_bytes(dead).c_str());
  std::printf("\n");
  if (not_collected && !a.dry_run) collect_and_say(*repo, false, "cbtfs-repo prune");
  return kExitOk;
}

int cmd_forget(const std::string& path, const std::string& vdi) {
  auto repo = open_repository(path);
  forget_vdi(repo, vdi, holder_text("cbtfs-repo forget"));
  std::printf("forgot VDI %s\n", vdi.c_str());
  if (repo->format() >= 2) collect_and_say(*repo, false, "cbtfs-repo forget");
  return kExitOk;
}

void merge_index_after_writing(Repository& repo, const char* program) {
  try {
    merge_index_segments(repo, holder_text(program));
  } catch (const std::exception& e) {  // the points are committed; the next collection merges
    std::fprintf(stderr, "%s: could not merge the dedup index's segments: %s\n", program, e.what());
  }
}

int cmd_gc(const std::string& path, bool dry_run) {
  auto repo = open_repository(path);
  collect_and_say(*repo, dry_run, "cbtfs-repo gc");
  return kExitOk;
}

}  // namespace cbtfs
