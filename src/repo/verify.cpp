// verify_vdi: walks every point's index tree and decodes every record once.
#include "cbtfs/verify.hpp"

#include <map>
#include <set>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/point_list.hpp"

namespace cbtfs {

namespace {

struct Walker {
  Repository& repo;
  const std::string& vdi;
  const std::function<void(uint64_t)>& progress;
  VerifyReport& report;
  std::set<std::pair<uint64_t, uint64_t>> good;
  std::map<std::pair<uint64_t, uint64_t>, std::string> bad;
  std::set<uint64_t> packs_seen;
  Bytes buf = Bytes(kBlockSize);

  // Returns the error text for a record, or empty when it verifies.
  std::string check(const BlockRef& ref, bool is_node) {
    auto key = std::make_pair(ref.pack, ref.offset);
    if (good.count(key)) return {};
    if (auto it = bad.find(key); it != bad.end()) return it->second;
    std::string err;
    try {
      if (packs_seen.insert(ref.pack).second) repo.check_pack(vdi, ref.pack);
      if (is_node) {
        Bytes node(node_size(repo.format()));
        repo.read_record(vdi, ref, node, true);
        ++report.nodes;
      } else {
        repo.read_record(vdi, ref, buf, true);
        ++report.blocks;
      }
      report.bytes_read += ref.length();
      if (progress) progress(report.bytes_read);
    } catch (const std::exception& e) {
      err = e.what();
    }
    if (err.empty()) good.insert(key);
    else bad.emplace(key, err);
    return err;
  }

  void walk(const Manifest& m, const BlockRef& ref, uint32_t level, uint64_t first_block) {
    if (ref.is_zero()) return;
    bool is_node = level > 0;
    std::string err = check(ref, is_node);
    std::string where = "VDI " + vdi + " point " + format_point_name(m.time) + " (seq " + std::to_string(m.seq) + ")";
    if (!err.empty()) {
      if (is_node)
        report.problems.push_back(where + ": index node for blocks " + std::to_string(first_block) + "+: " + err);
      else
        report.problems.push_back(where + ": block " + std::to_string(first_block) + ": " + err);
      return;
    }
    if (!is_node) return;
    auto node = repo.node(vdi, ref);
    IndexNode entries(*node, repo.format());
    uint64_t span = blocks_under(level - 1);
    uint64_t nblocks = block_count(m.virtual_size);
    for (uint32_t i = 0; i < kFanout; ++i) {
      BlockRef child = entries[i];
      uint64_t b = first_block + i * span;
      if (child.is_zero()) continue;
      if (b >= nblocks) {
        report.problems.push_back(where + ": index names block " + std::to_string(b) + " beyond the disk's end");
        continue;
      }
      walk(m, child, level - 1, b);
    }
  }
};

}  // namespace

VerifyReport verify_vdi(Repository& repo, const std::string& vdi, const std::function<void(uint64_t)>& progress) {
  VerifyReport report;
  auto pl = repo.points(vdi);
  for (auto& e : pl.errors) report.problems.push_back("VDI " + vdi + ": " + e);
  auto listed = check_point_list(repo, vdi);
  report.problems.insert(report.problems.end(), listed.problems.begin(), listed.problems.end());
  report.warnings.insert(report.warnings.end(), listed.warnings.begin(), listed.warnings.end());
  Walker w{repo, vdi, progress, report, {}, {}, {}};
  std::set<uint32_t> owned;
  for (auto& m : pl.points) {
    ++report.points;
    if (m->pack) owned.insert(m->pack);
    w.walk(*m, m->root, m->depth, 0);
  }
  for (auto& n : repo.storage().list(layout::packs_dir(vdi))) {
    uint32_t s = layout::parse_pack_name(n);
    if (s && !owned.count(s) && !w.packs_seen.count(s))
      report.warnings.push_back("VDI " + vdi + ": pack " + n + " holds nothing any point needs (left by an interrupted writer or prune; the next import or prune removes it)");
  }
  auto& st = repo.storage();
  if (size_t n = st.leftovers(layout::packs_dir(vdi)) + st.leftovers(layout::points_dir(vdi)))
    report.warnings.push_back("VDI " + vdi + ": " + std::to_string(n) +
                              " unfinished temporary file(s) left by an interrupted writer; the next writer of that "
                              "VDI removes them");
  return report;
}

}  // namespace cbtfs
