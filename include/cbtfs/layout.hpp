// Where everything of a repository lives, by key: the one place that spells
// the layout of cbtfs-format(5).
//
//   cbtfs-repository                  header: format name, version, repository id
//   vdis/<uuid>/points/<seq>.point    one manifest per committed point
//   vdis/<uuid>/packs/<seq>.pack      the records (data blocks, index nodes) it added
//   vdis/<uuid>/forgotten/<seq>       the highest number a forgotten point had
//   vdis/<uuid>/lists/<gen>.list      encrypted: the sealed list of its points (point_list.hpp)
//   vdis/<uuid>/lock                  the writer lock
//   vdis/<uuid>/journal               what a writer must clean up should it die
// Format 2 adds the block store that every VDI shares:
//   store/packs/<xx>/<id>.pack        records; <id> 16 hex digits, <xx> its first two
//   store/index/<id>.idx              sorted (block id -> where) entries of pack <id>
//   store/gc/lock, store/gc/sweeping  the collector's lock, and its mark while it frees
//   vdis/<uuid>/uses/<n>              packs a writer of the VDI relies on (see gc.hpp)
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace cbtfs::layout {

inline constexpr const char* kHeaderKey = "cbtfs-repository";
inline constexpr const char* kVdisDir = "vdis";
// An encrypted repository's key slots, one object each (keys/<16 hex>.slot):
// added and removed, never rewritten.
inline constexpr const char* kKeysDir = "keys";
std::string key_slot_key(const std::string& slot_id);

std::string vdi_dir(const std::string& vdi);
std::string points_dir(const std::string& vdi);
std::string packs_dir(const std::string& vdi);
std::string forgotten_dir(const std::string& vdi);
std::string lists_dir(const std::string& vdi);

std::string point_key(const std::string& vdi, uint32_t seq);
std::string pack_key(const std::string& vdi, uint32_t pack);
std::string forgotten_key(const std::string& vdi, uint32_t seq);
std::string point_list_key(const std::string& vdi, uint32_t generation);
std::string lock_key(const std::string& vdi);
std::string journal_key(const std::string& vdi);

// A name listed in points_dir / packs_dir / forgotten_dir back to its
// number; 0 for anything else (temporaries, strangers).
uint32_t parse_point_name(const std::string& name);
uint32_t parse_pack_name(const std::string& name);
uint32_t parse_forgotten_name(const std::string& name);
uint32_t parse_point_list_name(const std::string& name);

inline constexpr const char* kStorePacksDir = "store/packs";
inline constexpr const char* kStoreIndexDir = "store/index";
std::string store_pack_key(uint64_t pack);
std::string store_index_key(uint64_t segment);
// "0123456789abcdef.pack" / ".idx" back to its id; 0 for anything else.
uint64_t parse_store_pack_name(const std::string& name);
uint64_t parse_store_index_name(const std::string& name);
// A pack a collection rewrote (repacked_pack.hpp): "<id>-<generation>.pack"
// beside where "<id>.pack" was, generation 1, 2, ...
std::string store_repacked_key(uint64_t pack, uint32_t generation);
// The store's own name for a pack file: its id and generation (0: as
// written); nullopt for anything else.
struct StorePackFile {
  uint64_t pack;
  uint32_t generation;
};
std::optional<StorePackFile> parse_store_pack_file(const std::string& name);
// The directory of a pack's files.
std::string store_pack_dir(uint64_t pack);
inline constexpr const char* kGcLockKey = "store/gc/lock";
inline constexpr const char* kGcSweepingKey = "store/gc/sweeping";
inline constexpr const char* kGcLastKey = "store/gc/last";  // names the last collection that finished
std::string uses_dir(const std::string& vdi);
std::string uses_key(const std::string& vdi, uint32_t n);

}  // namespace cbtfs::layout
