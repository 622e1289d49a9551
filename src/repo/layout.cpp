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

std::string hex_id(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t parse_hex_id(const std::string& name, const std::string& suffix) {
  if (name.size() != 16 + suffix.size() || name.compare(16, suffix.size(), suffix) != 0) return 0;
  uint64_t v = 0;
  for (size_t i = 0; i < 16; ++i) {
    char c = name[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return 0;
    v = v << 4 | static_cast<uint64_t>(d);
  }
  return v;
}

}  // namespace

std::string key_slot_key(const std::string& slot_id) { return std::string(kKeysDir) + "/" + slot_id + ".slot"; }

std::string vdi_dir(const std::string& vdi) { return std::string(kVdisDir) + "/" + vdi; }
std::string points_dir(const std::string& vdi) { return vdi_dir(vdi) + "/points"; }
std::string packs_dir(const std::string& vdi) { return vdi_dir(vdi) + "/packs"; }
std::string forgotten_dir(const std::string& vdi) { return vdi_dir(vdi) + "/forgotten"; }
std::string lists_dir(const std::string& vdi) { return vdi_dir(vdi) + "/lists"; }

std::string point_key(const std::string& vdi, uint32_t seq) { return points_dir(vdi) + "/" + seq_name(seq, ".point"); }
std::string pack_key(const std::string& vdi, uint32_t pack) { return packs_dir(vdi) + "/" + seq_name(pack, ".pack"); }
std::string forgotten_key(const std::string& vdi, uint32_t seq) { return forgotten_dir(vdi) + "/" + seq_name(seq, ""); }
std::string point_list_key(const std::string& vdi, uint32_t generation) {
  return lists_dir(vdi) + "/" + seq_name(generation, ".list");
}
std::string lock_key(const std::string& vdi) { return vdi_dir(vdi) + "/lock"; }
std::string journal_key(const std::string& vdi) { return vdi_dir(vdi) + "/journal"; }

uint32_t parse_point_name(const std::string& name) { return parse_seq(name, ".point"); }
uint32_t parse_pack_name(const std::string& name) { return parse_seq(name, ".pack"); }
uint32_t parse_forgotten_name(const std::string& name) { return parse_seq(name, ""); }
uint32_t parse_point_list_name(const std::string& name) { return parse_seq(name, ".list"); }

// Two hex digits of fan-out keep a directory of a large store listable.
std::string store_pack_dir(uint64_t pack) { return std::string(kStorePacksDir) + "/" + hex_id(pack).substr(0, 2); }
std::string store_pack_key(uint64_t pack) { return store_pack_dir(pack) + "/" + hex_id(pack) + ".pack"; }
std::string store_repacked_key(uint64_t pack, uint32_t generation) {
  return store_pack_dir(pack) + "/" + hex_id(pack) + "-" + std::to_string(generation) + ".pack";
}
std::string uses_dir(const std::string& vdi) { return vdi_dir(vdi) + "/uses"; }
std::string uses_key(const std::string& vdi, uint32_t n) { return uses_dir(vdi) + "/" + seq_name(n, ""); }
std::string store_index_key(uint64_t segment) { return std::string(kStoreIndexDir) + "/" + hex_id(segment) + ".idx"; }
uint64_t parse_store_pack_name(const std::string& name) { return parse_hex_id(name, ".pack"); }
uint64_t parse_store_index_name(const std::string& name) { return parse_hex_id(name, ".idx"); }

std::optional<StorePackFile> parse_store_pack_file(const std::string& name) {
  if (uint64_t id = parse_store_pack_name(name)) return StorePackFile{id, 0};
  // "<16 hex>-<generation>.pack"
  if (name.size() < 16 + 7 || name[16] != '-' || !name.ends_with(".pack")) return std::nullopt;
  std::string gen = name.substr(17, name.size() - 17 - 5);
  if (gen.empty() || gen.size() > 9 || gen[0] == '0' || gen.find_first_not_of("0123456789") != std::string::npos)
    return std::nullopt;
  uint64_t id = parse_hex_id(name.substr(0, 16) + ".pack", ".pack");
  if (!id) return std::nullopt;
  return StorePackFile{id, static_cast<uint32_t>(std::stoul(gen))};
}

}  // namespace cbtfs::layout
