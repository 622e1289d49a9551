// cbtfs-repo ls / info: what the repository holds, for people and scripts.
#include <cctype>
#include <cstdio>
#include <set>
#include <nlohmann/json.hpp>

#include "cbtfs/errors.hpp"
#include "cbtfs/repository.hpp"
#include "commands.hpp"
#include "progress.hpp"
#include "text.hpp"

namespace cbtfs {

using nlohmann::json;

namespace {

json point_json(const Manifest& m) {
  return json{{"time", format_iso_time(m.time)},
              {"seq", m.seq},
              {"snapshot_uuid", m.snapshot_uuid},
              {"bytes_stored", m.bytes_stored},
              {"blocks_written", m.blocks_written},
              {"chain", m.chain},
              {"full", m.parent == 0},
              {"chain_reason", m.chain_reason},
              {"path", m.vdi + "/" + format_point_name(m.time) + ".raw"}};
}

}  // namespace

int cmd_ls(const std::string& path, bool as_json) {
  auto repo = open_repository(path);
  json vdis = json::array();
  int rc = kExitOk;
  for (auto& vdi : repo->vdis()) {
    auto pl = repo->points(vdi);
    for (auto& e : pl.errors) {
      std::fprintf(stderr, "cbtfs-repo: %s\n", e.c_str());
      rc = kExitFailed;
    }
    if (pl.points.empty()) continue;
    auto& last = *pl.points.back();
    if (as_json) {
      json points = json::array();
      for (auto& m : pl.points) points.push_back(point_json(*m));
      vdis.push_back(json{{"uuid", vdi},
                          {"name", last.vdi_name},
                          {"vm_name", last.vm_name},
                          {"vm_uuid", last.vm_uuid},
                          {"virtual_size", last.virtual_size},
                          {"points", points}});
      continue;
    }
    // Names come from the hypervisor and its guests: no terminal escapes.
    std::printf("%s  %s  VM %s  %s\n", vdi.c_str(), last.vdi_name.empty() ? "-" : printable(last.vdi_name).c_str(),
                last.vm_name.empty() ? "-" : printable(last.vm_name).c_str(), human_bytes(last.virtual_size).c_str());
    for (auto& m : pl.points) {
      std::string kind = m->parent ? "delta" : "full";
      std::printf("  %s.raw  %-5s  %10s stored  %8llu blocks%s%s\n", format_point_name(m->time).c_str(), kind.c_str(),
                  human_bytes(m->bytes_stored).c_str(), static_cast<unsigned long long>(m->blocks_written),
                  m->chain_reason.empty() ? "" : "  new chain: ", printable(m->chain_reason).c_str());
    }
  }
  if (as_json) std::printf("%s\n", json{{"repository", repo->storage().describe()}, {"vdis", vdis}}.dump(2).c_str());
  return rc;
}

int cmd_info(const std::string& path, const std::string& only) {
  auto repo = open_repository(path);
  std::printf("repository  %s\nformat      cbtfs v%u, %u KiB blocks\n", repo->storage().describe().c_str(),
              repo->format(), kBlockSize / 1024);
  if (repo->sealer()) {
    std::string cipher = cipher_name(repo->cipher());
    for (auto& c : cipher) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    std::printf("encryption  %s, %zu key slot(s)\n", cipher.c_str(), repo->key_slots().size());
  }
  uint64_t total = 0, npoints = 0, nvdis = 0;
  for (auto& vdi : repo->vdis()) {
    if (!only.empty() && vdi != only) continue;
    auto pl = repo->points(vdi);
    uint64_t bytes = 0;
    std::set<uint32_t> chains;
    for (auto& m : pl.points) {
      bytes += m->bytes_stored;
      chains.insert(m->chain);
    }
    ++nvdis;
    npoints += pl.points.size();
    total += bytes;
    if (!only.empty() || pl.points.empty()) {
      if (pl.points.empty()) {
        std::printf("VDI %s: no points\n", vdi.c_str());
        continue;
      }
      auto& last = *pl.points.back();
      std::printf("VDI         %s (%s, VM %s)\nsize        %s (%llu bytes)\npoints      %zu in %zu chain(s), "
                  "%s to %s\nstored      %s\n",
                  vdi.c_str(), printable(last.vdi_name).c_str(), printable(last.vm_name).c_str(),
                  human_bytes(last.virtual_size).c_str(),
                  static_cast<unsigned long long>(last.virtual_size), pl.points.size(), chains.size(),
                  format_iso_time(pl.points.front()->time).c_str(), format_iso_time(last.time).c_str(),
                  human_bytes(bytes).c_str());
      for (auto& e : pl.errors) std::printf("damaged     %s\n", e.c_str());
    }
  }
  if (!only.empty() && nvdis == 0) throw UsageError("no VDI " + only + " in " + path);
  std::printf("total       %llu VDI(s), %llu point(s), %s stored\n", static_cast<unsigned long long>(nvdis),
              static_cast<unsigned long long>(npoints), human_bytes(total).c_str());
  return kExitOk;
}

}  // namespace cbtfs
