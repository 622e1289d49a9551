#include "cbtfs/prune.hpp"

#include <algorithm>
#include <ctime>
#include <functional>
#include <map>
#include <set>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/point_list.hpp"

namespace cbtfs {

namespace {

std::tm utc(int64_t t) {
  std::time_t tt = t;
  std::tm tm{};
  gmtime_r(&tt, &tm);
  return tm;
}

// The bucket a time falls in for each rule.
int64_t bucket(int64_t t, int rule) {
  std::tm tm = utc(t);
  switch (rule) {
    case 0: return t / 3600;                                      // hour
    case 1: return t / 86400;                                     // day
    case 2: return (t / 86400 + 3) / 7;                           // ISO week (1970-01-01 was a Thursday)
    case 3: return (tm.tm_year + 1900) * 12 + tm.tm_mon;          // month
    default: return tm.tm_year + 1900;                            // year
  }
}

// The records (offset, length) each pack holds for the given points' trees.
using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
std::map<uint64_t, Ranges> live_records(Repository& repo, const std::string& vdi, const std::vector<ManifestPtr>& points) {
  std::map<uint64_t, Ranges> live;
  std::set<std::pair<uint64_t, uint64_t>> seen;
  std::function<void(const BlockRef&, uint32_t)> walk = [&](const BlockRef& ref, uint32_t level) {
    if (ref.is_zero() || !seen.insert({ref.pack, ref.offset}).second) return;
    live[ref.pack].emplace_back(ref.offset, ref.length());
    if (level == 0) return;
    auto node = repo.node(vdi, ref);
    IndexNode entries(*node, repo.format());
    for (uint32_t i = 0; i < kFanout; ++i) walk(entries[i], level - 1);
  };
  for (auto& m : points) walk(m->root, m->depth);
  return live;
}

}  // namespace

std::vector<bool> select_kept(const std::vector<int64_t>& times, const RetentionPolicy& p) {
  std::vector<bool> keep(times.size(), false);
  if (times.empty()) return keep;
  keep.back() = true;
  for (size_t i = times.size(), n = 0; i-- > 0 && n < static_cast<size_t>(p.last); ++n) keep[i] = true;
  const int counts[] = {p.hourly, p.daily, p.weekly, p.monthly, p.yearly};
  for (int rule = 0; rule < 5; ++rule) {
    int left = counts[rule];
    int64_t last_bucket = INT64_MIN;
    for (size_t i = times.size(); i-- > 0 && left > 0;) {
      int64_t b = bucket(times[i], rule);
      if (b == last_bucket) continue;  // an older point of a bucket already kept
      last_bucket = b;
      keep[i] = true;
      --left;
    }
  }
  return keep;
}

PruneReport prune_vdi(std::shared_ptr<Repository> repo, const std::string& vdi, const RetentionPolicy& policy,
                      bool dry_run, const std::string& holder) {
  if (!policy.any()) throw UsageError("no retention rule given: say what to keep (--keep-last N, --keep-daily N, ...)");
  auto lock = repo->lock_vdi(vdi, holder);
  auto pl = repo->points(vdi);
  if (!pl.errors.empty())
    throw FormatError("VDI " + vdi + " has a damaged manifest (" + pl.errors.front() +
                      "); run cbtfs-repo verify, and prune once it is dealt with");
  std::vector<int64_t> times;
  for (auto& m : pl.points) times.push_back(m->time);
  auto keep = select_kept(times, policy);

  PruneReport r;
  auto& st = repo->storage();
  // A point someone is reading (an open image, a restore) stays until they
  // close it; holding the others' claims keeps new readers out meanwhile.
  std::vector<std::unique_ptr<Claim>> claims(pl.points.size());
  auto in_use = [&](size_t i) {
    keep[i] = true;
    r.in_use.push_back(format_point_name(pl.points[i]->time) + ".raw");
  };
  for (size_t i = 0; i < pl.points.size(); ++i) {
    if (keep[i]) continue;
    claims[i] = st.claim_exclusive(layout::point_key(vdi, pl.points[i]->seq));
    if (!claims[i]) in_use(i);
  }
  // Manifests first: from here on the removed points are gone for every
  // reader, and no remaining point depends on them. A storage whose claims
  // cannot shut new readers out (S3) is asked once more after the removal;
  // a reader that came meanwhile gets its point back, byte for byte.
  if (!dry_run)
    for (size_t i = 0; i < pl.points.size(); ++i) {
      if (keep[i]) continue;
      std::string key = layout::point_key(vdi, pl.points[i]->seq);
      std::optional<Bytes> original;
      if (!claims[i]->exact()) original = st.get(key);
      st.remove(key);
      if (original && !claims[i]->alone()) {
        st.put(key, *original);
        in_use(i);
        continue;
      }
      repo->forget_point(vdi, pl.points[i]->seq);
    }
  // The list of the points there are now, sealed: a pruned point put
  // back behind cbtfs's back is then told from a kept one.
  if (!dry_run && std::find(keep.begin(), keep.end(), false) != keep.end()) write_point_list(*repo, vdi);
  std::vector<ManifestPtr> remaining;
  for (size_t i = 0; i < pl.points.size(); ++i) {
    std::string name = format_point_name(pl.points[i]->time) + ".raw";
    (keep[i] ? r.kept : r.removed).push_back(name);
    if (keep[i]) remaining.push_back(pl.points[i]);
  }
  if (repo->format() >= 2) {
    r.store_not_collected = !r.removed.empty();
    return r;
  }
  auto live = live_records(*repo, vdi, remaining);
  for (auto& n : st.list(layout::packs_dir(vdi))) {
    uint32_t pack = layout::parse_pack_name(n);
    if (!pack) continue;
    std::string key = layout::pack_key(vdi, pack);
    uint64_t size = st.size(key).value_or(0);
    auto it = live.find(pack);
    if (it == live.end()) {
      if (!dry_run) st.remove(key);
      ++r.packs_deleted;
      r.bytes_freed += size;
      continue;
    }
    // A pack some remaining point still needs: the records only removed
    // points used are gaps between live ones. Where the storage can, their
    // space is given back in place (nothing moves, so no reference changes).
    auto& ranges = it->second;
    std::sort(ranges.begin(), ranges.end());
    uint64_t pos = pack_header_size(1);
    auto gap = [&](uint64_t from, uint64_t to) {
      if (to <= from) return;
      uint64_t freed = dry_run ? st.discardable(key, from, to - from) : st.discard(key, from, to - from);
      r.bytes_freed += freed;
      r.bytes_dead += to - from - freed;
    };
    for (auto& [off, len] : ranges) {
      gap(pos, off);
      pos = std::max(pos, off + len);
    }
    gap(pos, size);
  }
  return r;
}

void forget_vdi(std::shared_ptr<Repository> repo, const std::string& vdi, const std::string& holder) {
  if (!is_uuid(vdi)) throw UsageError("'" + vdi + "' is not a VDI uuid");
  if (repo->storage().list(layout::vdi_dir(vdi)).empty()) throw UsageError("no VDI " + vdi + " in the repository");
  auto lock = repo->lock_vdi(vdi, holder);
  auto& st = repo->storage();
  // Point numbers are never used twice in a VDI's life (a long-lived mount
  // knows points by number), so the highest one outlives the points.
  uint32_t highest = 0;
  const std::string points = layout::points_dir(vdi), packs = layout::packs_dir(vdi);
  for (auto& n : st.list(points)) highest = std::max(highest, layout::parse_point_name(n));
  for (auto& n : st.list(packs)) highest = std::max(highest, layout::parse_pack_name(n));
  if (highest > 0 && !st.size(layout::forgotten_key(vdi, highest))) st.put(layout::forgotten_key(vdi, highest), {});
  // Newest first: a crash part-way leaves the older points, still complete.
  auto names = st.list(points);
  for (auto it = names.rbegin(); it != names.rend(); ++it) st.remove(points + "/" + *it);
  for (auto& n : st.list(packs)) st.remove(packs + "/" + n);
  for (auto& n : st.list(layout::lists_dir(vdi))) st.remove(layout::lists_dir(vdi) + "/" + n);
  st.remove_temporaries(points);
  st.remove_temporaries(packs);
}

}  // namespace cbtfs
