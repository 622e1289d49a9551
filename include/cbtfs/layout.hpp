// Where everything of a repository lives, by key: the one place that spells
// the layout of cbtfs-format(5).
//
//   cbtfs-repository                  header: format name, version, repository id
//   vdis/<uuid>/points/<seq>.point    one manifest per committed point
//   vdis/<uuid>/packs/<seq>.pack      the records (data blocks, index nodes) it added
//   vdis/<uuid>/forgotten/<seq>       the highest number a forgotten point had
//   vdis/<uuid>/lock                  the writer lock
//   vdis/<uuid>/journal               what a writer must clean up should it die
#pragma once

#include <cstdint>
#include <string>

namespace cbtfs::layout {

inline constexpr const char* kHeaderKey = "cbtfs-repository";
inline constexpr const char* kVdisDir = "vdis";

std::string vdi_dir(const std::string& vdi);
std::string points_dir(const std::string& vdi);
std::string packs_dir(const std::string& vdi);
std::string forgotten_dir(const std::string& vdi);

std::string point_key(const std::string& vdi, uint32_t seq);
std::string pack_key(const std::string& vdi, uint32_t pack);
std::string forgotten_key(const std::string& vdi, uint32_t seq);
std::string lock_key(const std::string& vdi);
std::string journal_key(const std::string& vdi);

// A name listed in points_dir / packs_dir / forgotten_dir back to its
// number; 0 for anything else (temporaries, strangers).
uint32_t parse_point_name(const std::string& name);
uint32_t parse_pack_name(const std::string& name);
uint32_t parse_forgotten_name(const std::string& name);

}  // namespace cbtfs::layout
