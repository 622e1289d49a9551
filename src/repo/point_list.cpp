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

ListState list_state(Storage& st, const std::string& vdi) {
  ListState s;
  for (auto& name : st.list(layout::lists_dir(vdi)))
    if (uint32_t g = layout::parse_point_list_name(name)) {
      if (s.generation) s.older.push_back(std::min(s.generation, g));
      s.generation = std::max(s.generation, g);
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

PointListCheck compare(Repository& repo, const std::string& vdi, const ListState& s) {
  PointListCheck c;
  auto& st = repo.storage();
  std::string where = "VDI " + vdi + ": ";
  if (!s.generation) {
    if (!s.manifests.empty())
      c.warnings.push_back(where + "no sealed point list yet (its points were written by an older cbtfs); the next "
                                   "backup or prune writes one");
    return c;
  }
  std::string key = layout::point_list_key(vdi, s.generation);
  json list;
  try {
    auto data = st.get(key);
    if (!data) throw CorruptError("gone");
    Bytes plain = open_point_list(*repo.sealer(), *data, vdi, s.generation);
    list = json::parse(std::string(reinterpret_cast<const char*>(plain.data()), plain.size())).at("point_list");
  } catch (const std::exception& e) {  // CorruptError, or JSON that a sealed list cannot hold
    c.problems.push_back(where + "the point list " + key + " does not open: " + e.what());
    return c;
  }
  auto listed = list.at("points").get<std::set<uint32_t>>();
  auto highest = list.at("highest").get<uint32_t>();
  for (uint32_t seq : listed)
    if (!s.manifests.count(seq))
      c.problems.push_back(where + "point " + std::to_string(seq) +
                           " is missing: its manifest was removed by something other than cbtfs");
  for (uint32_t seq : s.manifests)
    if (!listed.count(seq) && seq <= highest)
      c.problems.push_back(where + "point " + point_name(repo, vdi, seq) +
                           " was removed by a prune and its manifest is back (put there by something other than "
                           "cbtfs)");
  return c;
}

}  // namespace

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
