// A format 2 pack rewritten by a collection on a storage that cannot free
// ranges of an object (S3): its live records only, back to back, under a
// key of its own (store/packs/XX/<pack>-<generation>.pack), headed by a
// table of where each record was. References keep the original offsets,
// so no index tree changes; a read translates through the table. Each
// rewrite of a rewritten pack makes the next generation, again from the
// original offsets.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cbtfs/storage.hpp"

namespace cbtfs {

struct RepackedPack {
  uint64_t pack = 0;
  uint32_t generation = 0;
  std::vector<uint64_t> offsets;  // original offsets, ascending
  std::vector<uint32_t> lengths;  // stored lengths
  std::vector<uint64_t> at;       // where each record is in this object

  // Where the record once at `offset` is now; nullopt when it was not
  // copied (it was dead) or its length does not match.
  std::optional<uint64_t> find(uint64_t offset, uint32_t length) const;
  // The bytes of the header and table.
  uint64_t header_size() const { return header_size(offsets.size()); }
  static uint64_t header_size(size_t records);
};

// Header and table of a rewrite of `pack` holding these records (original
// offset, stored length), ascending by offset; the records follow it in
// that order.
Bytes encode_repacked_header(uint64_t pack, uint32_t generation,
                             const std::vector<std::pair<uint64_t, uint32_t>>& records);

// Reads and checks the header and table at key; throws FormatError naming
// the damage, StorageError when it cannot be read.
RepackedPack read_repacked_pack(Storage& storage, const std::string& key, uint64_t pack);

}  // namespace cbtfs
