#include "cbtfs/layout.hpp"

#include <cstdio>

namespace cbtfs::layout {

namespace {

// Eight digits sort like numbers, so a listing comes out oldest first.
std::string seq_name(uint32_t seq, const char* suffix) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08u%s", seq, suffix);
  return buf;
}

uint32_t parse_seq(const std::string& name, const std::string& suffix) {
  if (name.size() != 8 + suffix.size() || name.compare(8, suffix.size(), suffix) != 0) return 0;
  uint32_t v = 0;
  for (size_t i = 0; i < 8; ++i) {
    if (name[i] < '0' || name[i] > '9') return 0;
    v = v * 10 + static_cast<uint32_t>(name[i] - '0');
  }
  return v;
}

}  // namespace

std::string vdi_dir(const std::string& vdi) { return std::string(kVdisDir) + "/" + vdi; }
std::string points_dir(const std::string& vdi) { return vdi_dir(vdi) + "/points"; }
std::string packs_dir(const std::string& vdi) { return vdi_dir(vdi) + "/packs"; }
std::string forgotten_dir(const std::string& vdi) { return vdi_dir(vdi) + "/forgotten"; }

std::string point_key(const std::string& vdi, uint32_t seq) { return points_dir(vdi) + "/" + seq_name(seq, ".point"); }
std::string pack_key(const std::string& vdi, uint32_t pack) { return packs_dir(vdi) + "/" + seq_name(pack, ".pack"); }
std::string forgotten_key(const std::string& vdi, uint32_t seq) { return forgotten_dir(vdi) + "/" + seq_name(seq, ""); }
std::string lock_key(const std::string& vdi) { return vdi_dir(vdi) + "/lock"; }
std::string journal_key(const std::string& vdi) { return vdi_dir(vdi) + "/journal"; }

uint32_t parse_point_name(const std::string& name) { return parse_seq(name, ".point"); }
uint32_t parse_pack_name(const std::string& name) { return parse_seq(name, ".pack"); }
uint32_t parse_forgotten_name(const std::string& name) { return parse_seq(name, ""); }

}  // namespace cbtfs::layout
