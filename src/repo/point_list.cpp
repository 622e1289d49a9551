// The sealed point list: {"point_list": {"vdi", "generation", "highest",
// "points": [seq...]}}, sealed and framed as a manifest is.
#include "cbtfs/point_list.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/seal.hpp"

namespace cbtfs {

namespace {

using nlohmann::json;

struct ListState {
  uint32_t generation = 0;  // of the newest list; 0: none
  std::vector<uint32_t> older;
  std::set<uint32_t> manifests;
};

// The generations of the VDI's lists there are, oldest first.
std::vector<uint32_t> list_generations(Storage& st, const std::string& vdi) {
  std::vector<uint32_t> out;
  for (auto& name : st.list(layout::lists_dir(vdi)))
    if (uint32_t g = layout::parse_point_list_name(name)) out.push_back(g);
  std::sort(out.begin(), out.end());
  return out;
}

ListState list_state(Storage& st, const std::string& vdi) {
  ListState s;
  s.older = list_generations(st, vdi);
  if (!s.older.empty()) {
    s.generation = s.older.back();
    s.older.pop_back();
  }
  for (auto& name : st.list(layout::points_dir(vdi)))
    if (uint32_t seq = layout::parse_point_name(name)) s.manifests.insert(seq);
  return s;
}

std::string point_name(Repository& repo, const std::string& vdi, uint32_t seq) {
  try {
    if (auto m = repo.manifest(vdi, seq)) return format_point_name(m->time) + " (seq " + std::to_string(seq) + ")";
  } catch (const FormatError&) {
  }
  return "seq " + std::to_string(seq);
}

}  // namespace

void write_point_list(Repository& repo, const std::string& vdi) {
  const Sealer* sealer = repo.sealer();
  if (!sealer) return;
  auto& st = repo.storage();
  ListState s = list_state(st, vdi);
  uint32_t generation = s.generation + 1;
  json body{{"vdi", vdi},
            {"generation", generation},
            {"highest", repo.highest_seq(vdi)},
            {"points", std::vector<uint32_t>(s.manifests.begin(), s.manifests.end())}};
  std::string text = json{{"point_list", body}}.dump();
  st.put(layout::point_list_key(vdi, generation),
         seal_point_list(*sealer, std::as_bytes(std::span(text)), vdi, generation));
  s.older.push_back(s.generation);
  for (uint32_t g : s.older)
    if (g) st.remove(layout::point_list_key(vdi, g));
}

namespace {

// Throws CorruptError when the list is gone or does not open.
ListedPoints open_list(Repository& repo, const std::string& vdi, uint32_t generation) {
  auto data = repo.storage().get(layout::point_list_key(vdi, generation));
  if (!data) throw CorruptError("gone");
  Bytes plain = open_point_list(*repo.sealer(), *data, vdi, generation);
  try {
    auto list = json::parse(std::string(reinterpret_cast<const char*>(plain.data()), plain.size())).at("point_list");
    return {list.at("points").get<std::set<uint32_t>>(), list.at("highest").get<uint32_t>()};
  } catch (const json::exception& e) {  // JSON that a sealed list cannot hold
    throw CorruptError(e.what());
  }
}

PointListCheck compare(Repository& repo, const std::string& vdi, const ListState& s) {
  PointListCheck c;
  std::string where = "VDI " + vdi + ": ";
  if (!s.generation) {
    if (!s.manifests.empty())
      c.warnings.push_back(where + "no sealed point list yet (its points were written by an older cbtfs); the next "
                                   "backup or prune writes one");
    return c;
  }
  ListedPoints list;
  try {
    list = open_list(repo, vdi, s.generation);
  } catch (const std::exception& e) {  // damaged, gone, or a storage error: verify reports each
    c.problems.push_back(where + "the point list " + layout::point_list_key(vdi, s.generation) +
                         " does not open: " + e.what());
    return c;
  }
  for (uint32_t seq : list.points)
    if (!s.manifests.count(seq))
      c.problems.push_back(where + "point " + std::to_string(seq) +
                           " is missing: its manifest was removed by something other than cbtfs");
  for (uint32_t seq : s.manifests)
    if (!list.allows(seq))
      c.problems.push_back(where + "point " + point_name(repo, vdi, seq) +
                           " was removed by a prune and its manifest is back (put there by something other than "
                           "cbtfs)");
  return c;
}

}  // namespace

std::optional<ListedPoints> read_listed_points(Repository& repo, const std::string& vdi) {
  if (!repo.sealer()) return std::nullopt;
  // A writer may replace the newest list between the listing and the read:
  // the second look finds its successor.
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto generations = list_generations(repo.storage(), vdi);
    if (generations.empty()) return std::nullopt;
    try {
      return open_list(repo, vdi, generations.back());
    } catch (const CorruptError&) {
    }
  }
  return std::nullopt;
}

PointListCheck check_point_list(Repository& repo, const std::string& vdi) {
  if (!repo.sealer()) return {};
  auto& st = repo.storage();
  PointListCheck c = compare(repo, vdi, list_state(st, vdi));
  if (c.problems.empty()) return c;
  // A prune between its removals and its list looks the same: look again
  // holding the VDI's lock (only now, so that a backup starting meanwhile
  // is not turned away for nothing).
  try {
    auto lock = repo.lock_vdi(vdi, holder_text("cbtfs-repo verify"));
    return compare(repo, vdi, list_state(st, vdi));
  } catch (const LockedError&) {
    return {{}, {"VDI " + vdi + " is being written: its point list is checked by the next verify"}};
  } catch (const StorageError& e) {
    c.warnings.push_back("VDI " + vdi + ": the point list's findings could not be confirmed under the VDI's lock (" +
                         e.what() + ")");
    return c;
  }
}

}  // namespace cbtfs
