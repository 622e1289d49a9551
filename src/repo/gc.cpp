#include "cbtfs/gc.hpp"

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/parallel.hpp"
#include "dedup_index.hpp"
#include "repacked_pack.hpp"
#include "store_sink.hpp"

namespace cbtfs {

namespace {

// A pack's files: the newest (as written, or a collection's rewrite of it)
// and older ones that a collection which died left behind.
struct PackFiles {
  uint32_t generation = 0;
  std::vector<uint32_t> older;
};

std::string pack_file_key(uint64_t pack, uint32_t generation) {
  return generation ? layout::store_repacked_key(pack, generation) : layout::store_pack_key(pack);
}

std::map<uint64_t, PackFiles> list_packs(Storage& st) {
  std::map<uint64_t, PackFiles> packs;
  for (auto& dir : st.list(layout::kStorePacksDir))
    for (auto& n : st.list(std::string(layout::kStorePacksDir) + "/" + dir)) {
      auto f = layout::parse_store_pack_file(n);
      if (!f || n.compare(0, 2, dir) != 0) continue;
      auto [it, first] = packs.try_emplace(f->pack);
      PackFiles& p = it->second;
      if (first) {
        p.generation = f->generation;
      } else if (f->generation > p.generation) {
        p.older.push_back(p.generation);
        p.generation = f->generation;
      } else {
        p.older.push_back(f->generation);
      }
    }
  return packs;
}

// Copies the live records of a pack into its next generation (see
// repacked_pack.hpp), reading neighbouring records together, and removes
// the files it replaces. refs: ascending by offset, one per record.
void rewrite_pack(Storage& st, StorageLock& lock, uint64_t pack, const PackFiles& files,
                  const std::vector<BlockRef>& refs) {
  std::string from = pack_file_key(pack, files.generation);
  std::optional<RepackedPack> moved;
  if (files.generation) moved = read_repacked_pack(st, from, pack);
  std::vector<std::pair<uint64_t, uint32_t>> records;
  for (auto& ref : refs) records.emplace_back(ref.offset, ref.length());
  auto where = [&](size_t k) {
    if (!moved) return records[k].first;
    auto at = moved->find(records[k].first, records[k].second);
    if (!at) throw FormatError(st.describe() + "/" + from + ": a live record is missing from it");
    return *at;
  };
  uint32_t generation = files.generation + 1;
  auto w = st.create(layout::store_repacked_key(pack, generation));
  w->append(encode_repacked_header(pack, generation, records));
  constexpr uint64_t kMaxGap = 256 << 10, kMaxRead = 16 << 20;
  for (size_t i = 0; i < records.size();) {
    uint64_t start = where(i), end = start + records[i].second;
    size_t j = i + 1;
    for (; j < records.size(); ++j) {
      uint64_t at = where(j);
      if (at < end || at - end > kMaxGap || at + records[j].second - start > kMaxRead) break;
      end = at + records[j].second;
    }
    Bytes run(end - start);
    st.read(from, start, run);
    for (size_t k = i; k < j; ++k)
      w->append(std::span<const std::byte>(run).subspan(where(k) - start, records[k].second));
    i = j;
  }
  lock.check();
  w->commit();
  st.remove(from);
  for (uint32_t g : files.older) st.remove(pack_file_key(pack, g));
}

// Packs that running writers rely on. A VDI whose lock is free has no
// writer: what its uses/ still names was left by a dead one.
std::set<uint64_t> packs_in_use(Repository& repo) {
  auto& st = repo.storage();
  std::set<uint64_t> in_use;
  for (auto& vdi : repo.vdis()) {
    auto names = st.list(layout::uses_dir(vdi));
    if (names.empty()) continue;
    if (auto lock = st.try_lock(layout::lock_key(vdi), "cbtfs-repo gc (checking for a writer)")) continue;
    for (auto& n : names) {
      auto b = st.get(layout::uses_dir(vdi) + "/" + n);
      if (!b) continue;
      std::string text(reinterpret_cast<const char*>(b->data()), b->size());
      try {
        in_use.insert(std::stoull(text));
      } catch (const std::exception&) {
        // Not a number: a torn name of a writer that is still running
        // would be rewritten before it relies on anything.
      }
    }
  }
  return in_use;
}

// Every record some point references, by pack: the live set. VDIs are
// walked side by side where requests take a round trip.
std::map<uint64_t, std::vector<BlockRef>> mark(Repository& repo) {
  std::map<uint64_t, std::vector<BlockRef>> live;
  std::set<std::pair<uint64_t, uint64_t>> seen;
  std::mutex mu;
  std::function<void(const std::string&, const BlockRef&, uint32_t)> walk = [&](const std::string& vdi,
                                                                                  const BlockRef& ref, uint32_t level) {
    if (ref.is_zero()) return;
    {
      std::lock_guard g(mu);
      if (!seen.insert({ref.pack, ref.offset}).second) return;
      live[ref.pack].push_back(ref);
    }
    if (level == 0) return;
    auto node = repo.node(vdi, ref, /*keep=*/false);
    IndexNode entries(*node, repo.format());
    for (uint32_t i = 0; i < kFanout; ++i) walk(vdi, entries[i], level - 1);
  };
  auto vdis = repo.vdis();
  parallel_for(vdis.size(), repo.storage().parallelism(), [&](size_t v) {
    auto pl = repo.points(vdis[v]);
    if (!pl.errors.empty())
      throw FormatError("cannot collect the store: " + pl.errors.front() +
                        " (a point that cannot be read may need any record; run cbtfs-repo verify)");
    for (auto& m : pl.points) walk(vdis[v], m->root, m->depth);
  });
  return live;
}

// Past this many segments a collection merges them even if nothing died:
// a lookup reads a page of every segment whose range holds the id.
constexpr size_t kMergeAbove = 16;

// A pack is rewritten once at least 1/kRewriteDeadShare of it is dead, and
// a run copies at most kRewritePerRun bytes of live records (the rest waits
// for the next one).
constexpr uint64_t kRewriteDeadShare = 5;
constexpr uint64_t kRewritePerRun = uint64_t{8} << 30;

struct Segments {
  std::vector<std::string> keys;   // the ones this collection replaces
  std::vector<BlockRef> entries;   // theirs
  std::set<uint64_t> damaged;      // segments that could not be read (their pack's id, or a merged one's)
};

// The index segments of the packs this collection judges (listed when it
// started, no running writer relies on them), and every merged one. Those
// of packs that appeared since or that a writer relies on are left as
// they are.
Segments read_segments(Storage& st, const std::set<uint64_t>& judged) {
  std::vector<std::string> keys;
  for (auto& name : st.list(layout::kStoreIndexDir))
    if (layout::parse_store_index_name(name)) keys.push_back(std::string(layout::kStoreIndexDir) + "/" + name);
  enum class Got { entries, damaged, gone, not_judged };
  std::vector<Got> got(keys.size());
  std::vector<std::vector<BlockRef>> entries(keys.size());
  parallel_for(keys.size(), st.parallelism(), [&](size_t i) {
    uint64_t pack = 0;
    try {
      entries[i] = read_index_segment(st, keys[i], pack);
      got[i] = pack != 0 && !judged.count(pack) ? Got::not_judged : Got::entries;
    } catch (const FormatError&) {
      got[i] = Got::damaged;  // replaced by what the marking knows: only dedup hits are lost
    } catch (const StorageError& e) {
      if (e.error_number() != ENOENT) throw;
      got[i] = Got::gone;
    }
  });
  Segments s;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (got[i] == Got::damaged) {
      s.damaged.insert(layout::parse_store_index_name(keys[i].substr(keys[i].rfind('/') + 1)));
      s.keys.push_back(keys[i]);
    } else if (got[i] == Got::entries) {
      s.keys.push_back(keys[i]);
      s.entries.insert(s.entries.end(), entries[i].begin(), entries[i].end());
    }
  }
  return s;
}

}  // namespace

GcReport collect_store(Repository& repo, bool dry_run, const std::string& holder) {
  if (repo.format() < 2) throw UsageError("gc is for format 2 repositories; format 1 frees space at prune");
  auto& st = repo.storage();
  auto lock = st.try_lock(layout::kGcLockKey, holder);
  if (!lock) {
    std::string who = st.lock_holder(layout::kGcLockKey);
    throw LockedError("another collection of the store is running" + (who.empty() ? "" : " (" + who + ")"));
  }
  GcReport r;
  if (!dry_run) {
    st.remove(layout::kGcSweepingKey);  // left by a collection that died
    lock->check();
    st.put(layout::kGcSweepingKey, std::as_bytes(std::span(holder)));
  }
  // The order below is the protocol: packs, then uses/, then manifests.
  // Half-written packs and segments are listed with the packs: a writer
  // names its pack before it begins writing it, so one whose writer is
  // alive is named in uses/ by the time that is read.
  auto packs = list_packs(st);
  std::vector<std::pair<uint64_t, std::string>> unfinished;
  for (const char* dir : {layout::kStorePacksDir, layout::kStoreIndexDir})
    for (auto& key : st.unfinished(dir)) {
      std::string name = key.substr(key.rfind('/') + 1);
      uint64_t id = layout::parse_store_index_name(name);
      if (!id)
        if (auto f = layout::parse_store_pack_file(name)) id = f->pack;
      if (id) unfinished.emplace_back(id, key);
    }
  auto in_use = packs_in_use(repo);
  for (auto& [id, key] : unfinished)
    if (!in_use.count(id)) {
      ++r.unfinished_dropped;
      if (!dry_run) st.drop_unfinished(key);
    }
  auto live = mark(repo);
  r.packs = packs.size();
  std::set<uint64_t> judged;
  for (auto& [pack, files] : packs)
    if (!in_use.count(pack)) judged.insert(pack);
  r.packs_in_use = packs.size() - judged.size();
  std::set<std::pair<uint64_t, uint64_t>> live_at;
  for (auto& [pack, refs] : live)
    for (auto& ref : refs) live_at.insert({pack, ref.offset});

  // The index first: once it names no dead record, no writer that starts
  // looking records up from now on can find one, and they may be freed.
  Segments seg = read_segments(st, judged);
  // The merged segment lists what the marking found live (a record lost
  // from a damaged segment is listed again), and what the replaced
  // segments list of packs a running writer relies on.
  std::vector<BlockRef> kept;
  for (auto& [pack, refs] : live)
    if (judged.count(pack)) kept.insert(kept.end(), refs.begin(), refs.end());
  std::set<uint64_t> with_dead;  // packs the index listed dead records of
  for (auto& e : seg.entries) {
    if (in_use.count(e.pack))
      kept.push_back(e);
    else if (!live_at.count({e.pack, e.offset}))
      with_dead.insert(e.pack);
  }
  for (uint64_t id : seg.damaged)  // what it listed is unknown: its pack's dead bytes are looked for
    if (judged.count(id)) with_dead.insert(id);
  bool rewrite = !with_dead.empty() || !seg.damaged.empty() || seg.keys.size() > kMergeAbove;
  r.index_segments = seg.keys.size();
  if (rewrite && !dry_run) {
    r.index_entries = kept.size();
    if (!kept.empty()) {
      lock->check();
      st.put(layout::store_index_key(random_store_id()), encode_index_segment(std::move(kept), 0));
    }
    for (auto& key : seg.keys) {
      lock->check();
      st.remove(key);
    }
  }

  // A storage that cannot free ranges of an object (S3) gets partly dead
  // packs rewritten instead, the most dead first, within a bound per run.
  bool frees_ranges = st.discardable(layout::store_pack_key(0), 0, 1 << 20) > 0;
  struct Rewrite {
    uint64_t pack, size, dead, gain, live;  // gain: what the rewrite gives back
  };
  std::vector<Rewrite> rewrites;
  // Packs are judged side by side where requests take a round trip; each
  // adds what it found to the report under mu.
  std::mutex mu;
  std::vector<uint64_t> order(judged.begin(), judged.end());
  parallel_for(order.size(), st.parallelism(), [&](size_t n) {
    uint64_t pack = order[n];
    const PackFiles& files = packs.at(pack);
    std::string key = pack_file_key(pack, files.generation);
    uint64_t size = st.size(key).value_or(0);
    uint64_t older = 0;
    for (uint32_t g : files.older) older += st.size(pack_file_key(pack, g)).value_or(0);
    GcReport here;
    auto add = [&] {
      std::lock_guard g(mu);
      r.packs_removed += here.packs_removed;
      r.live_records += here.live_records;
      r.bytes_freed += here.bytes_freed;
      r.bytes_dead += here.bytes_dead;
    };
    auto it = live.find(pack);
    if (it == live.end()) {
      here.packs_removed = 1;
      here.bytes_freed = size + older;
      if (!dry_run) {
        lock->check();
        st.remove(layout::store_index_key(pack));  // a segment written after the listing above
        st.remove(key);
        for (uint32_t g : files.older) st.remove(pack_file_key(pack, g));
      }
      return add();
    }
    auto& refs = it->second;
    here.live_records = refs.size();
    std::sort(refs.begin(), refs.end(), [](const BlockRef& a, const BlockRef& b) { return a.offset < b.offset; });
    if (!files.older.empty()) {
      // A collection died between writing a rewrite and removing what it
      // replaced: the rewrite holds every live record (nothing dead then
      // can have come back to life), which is checked before trusting it.
      bool whole = true;
      if (files.generation) {
        RepackedPack moved = read_repacked_pack(st, key, pack);
        for (auto& ref : refs) whole = whole && moved.find(ref.offset, ref.length()).has_value();
      }
      if (whole) {
        here.bytes_freed += older;
        if (!dry_run)
          for (uint32_t g : files.older) st.remove(pack_file_key(pack, g));
      }
    }
    if (!frees_ranges) {
      uint64_t live_bytes = 0;
      for (auto& ref : refs) live_bytes += ref.length();
      uint64_t now = live_bytes + (files.generation ? RepackedPack::header_size(refs.size()) : pack_header_size(2));
      uint64_t rewritten = live_bytes + RepackedPack::header_size(refs.size());
      if (size > now) {
        std::lock_guard g(mu);
        rewrites.push_back({pack, size, size - now, size > rewritten ? size - rewritten : 0, live_bytes});
      }
      return add();
    }
    // A pack the index lists no dead record of has lost nothing since the
    // last collection (which freed what was dead then).
    if (!with_dead.count(pack)) return add();
    std::vector<std::pair<uint64_t, uint64_t>> gaps;
    uint64_t pos = pack_header_size(2);
    for (auto& ref : refs) {
      if (ref.offset > pos) gaps.emplace_back(pos, ref.offset);
      pos = std::max(pos, ref.offset + ref.length());
    }
    if (size > pos) gaps.emplace_back(pos, size);
    for (auto& [from, to] : gaps) {
      uint64_t freed = dry_run ? st.discardable(key, from, to - from) : st.discard(key, from, to - from);
      here.bytes_freed += freed;
      here.bytes_dead += to - from - freed;
    }
    add();
  });
  std::sort(rewrites.begin(), rewrites.end(), [](const Rewrite& a, const Rewrite& b) { return a.dead > b.dead; });
  std::vector<uint64_t> chosen;
  uint64_t copied = 0;
  for (auto& w : rewrites) {
    // A pack mostly live is not worth its copy yet; the bound keeps a run
    // after a large prune from copying the whole store at once.
    if (w.dead < w.size / kRewriteDeadShare || (copied && copied + w.live > kRewritePerRun)) {
      r.bytes_dead += w.dead;
      continue;
    }
    copied += w.live;
    ++r.packs_rewritten;
    r.bytes_rewritten += w.live;
    r.bytes_freed += w.gain;  // the dead records, less the rewrite's longer header
    chosen.push_back(w.pack);
  }
  // A few at a time: each holds up to 16 MiB of records it read, and its upload's parts.
  if (!dry_run)
    parallel_for(chosen.size(), std::min(4u, st.parallelism()), [&](size_t n) {
      rewrite_pack(st, *lock, chosen[n], packs.at(chosen[n]), live.at(chosen[n]));  // one ref per record: mark()
    });
  if (!dry_run) {
    // A writer that looked records up before this collection freed some
    // must not trust what it saw: it compares this name with the one it
    // read before its first lookup.
    std::string done = holder + " " + random_uuid();
    st.remove(layout::kGcLastKey);
    st.put(layout::kGcLastKey, std::as_bytes(std::span(done)));
    st.remove(layout::kGcSweepingKey);
  }
  return r;
}

size_t merge_index_segments(Repository& repo, const std::string& holder) {
  constexpr size_t kWriterMergeAbove = 32;
  if (repo.format() < 2) return 0;
  auto& st = repo.storage();
  std::vector<std::string> own;  // segments of one pack each
  for (auto& name : st.list(layout::kStoreIndexDir)) {
    if (!layout::parse_store_index_name(name)) continue;
    std::string key = std::string(layout::kStoreIndexDir) + "/" + name;
    if (auto pack = index_segment_pack(st, key); pack && *pack != 0) own.push_back(key);
  }
  if (own.size() <= kWriterMergeAbove) return 0;
  auto lock = st.try_lock(layout::kGcLockKey, holder);
  if (!lock || st.size(layout::kGcSweepingKey)) return 0;
  // In groups of at most kMaxEntries entries, so that a writer merging the
  // segments of a large first backup stays near 150 MiB (about 150 bytes an entry).
  constexpr size_t kMaxEntries = size_t{1} << 20;
  size_t merged = 0;
  std::vector<BlockRef> entries;
  std::vector<std::string> group;
  auto flush = [&] {
    if (group.empty()) return;
    // The merged segment first: an entry is never missing from the index
    // for longer than it takes to remove the ones it replaces.
    lock->check();
    st.put(layout::store_index_key(random_store_id()), encode_index_segment(std::move(entries), 0));
    for (auto& key : group) {
      lock->check();
      st.remove(key);
    }
    merged += group.size();
    entries.clear();
    group.clear();
  };
  for (auto& key : own) {
    uint64_t pack = 0;
    try {
      auto e = read_index_segment(st, key, pack);
      if (!entries.empty() && entries.size() + e.size() > kMaxEntries) flush();
      entries.insert(entries.end(), e.begin(), e.end());
      group.push_back(key);
    } catch (const FormatError&) {  // left for the next collection, which lists its pack again
    } catch (const StorageError& e) {
      if (e.error_number() != ENOENT) throw;
    }
  }
  flush();
  return merged;
}

}  // namespace cbtfs
