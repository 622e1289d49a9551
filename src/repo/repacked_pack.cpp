#include "repacked_pack.hpp"

#include <xxhash.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>

#include "cbtfs/errors.hpp"

namespace cbtfs {

namespace {

static_assert(std::endian::native == std::endian::little, "the format's integers are little-endian");

constexpr std::array<char, 8> kMagic = {'C', 'B', 'T', 'F', 'S', 'R', 'P', '2'};
constexpr uint64_t kFixed = 32;      // magic, version, generation, pack id, record count
constexpr uint64_t kEntry = 16;      // original offset u64, stored length u32, 0 u32
constexpr uint64_t kMaxRecords = uint64_t{1} << 22;  // a 128 MiB pack of records of 32 bytes

template <typename T>
void put(std::byte* p, T v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
T get(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace

uint64_t RepackedPack::header_size(size_t records) { return kFixed + kEntry * records + 8; }

std::optional<uint64_t> RepackedPack::find(uint64_t offset, uint32_t length) const {
  auto it = std::lower_bound(offsets.begin(), offsets.end(), offset);
  if (it == offsets.end() || *it != offset) return std::nullopt;
  size_t i = static_cast<size_t>(it - offsets.begin());
  if (lengths[i] != length) return std::nullopt;
  return at[i];
}

Bytes encode_repacked_header(uint64_t pack, uint32_t generation,
                             const std::vector<std::pair<uint64_t, uint32_t>>& records) {
  Bytes h(RepackedPack::header_size(records.size()));
  std::memcpy(h.data(), kMagic.data(), kMagic.size());
  put<uint32_t>(h.data() + 8, 2);
  put<uint32_t>(h.data() + 12, generation);
  put<uint64_t>(h.data() + 16, pack);
  put<uint64_t>(h.data() + 24, records.size());
  std::byte* e = h.data() + kFixed;
  for (auto& [offset, length] : records) {
    put<uint64_t>(e, offset);
    put<uint32_t>(e + 8, length);
    e += kEntry;
  }
  put<uint64_t>(e, XXH3_64bits(h.data(), static_cast<size_t>(e - h.data())));
  return h;
}

RepackedPack read_repacked_pack(Storage& st, const std::string& key, uint64_t pack) {
  std::string where = st.describe() + "/" + key;
  Bytes fixed(kFixed);
  st.read(key, 0, fixed);
  if (std::memcmp(fixed.data(), kMagic.data(), kMagic.size()) != 0)
    throw FormatError(where + ": not a rewritten cbtfs pack");
  if (get<uint32_t>(fixed.data() + 8) != 2)
    throw VersionError(where + ": rewritten pack of version " + std::to_string(get<uint32_t>(fixed.data() + 8)));
  RepackedPack r;
  r.generation = get<uint32_t>(fixed.data() + 12);
  r.pack = get<uint64_t>(fixed.data() + 16);
  uint64_t n = get<uint64_t>(fixed.data() + 24);
  if (r.pack != pack) throw FormatError(where + ": pack id does not match its name");
  if (n > kMaxRecords) throw FormatError(where + ": impossible record count " + std::to_string(n));
  Bytes h(RepackedPack::header_size(n));
  st.read(key, 0, h);
  const std::byte* sum = h.data() + h.size() - 8;
  if (get<uint64_t>(sum) != XXH3_64bits(h.data(), h.size() - 8)) throw FormatError(where + ": damaged record table");
  uint64_t pos = h.size();
  for (uint64_t i = 0; i < n; ++i) {
    const std::byte* e = h.data() + kFixed + kEntry * i;
    uint64_t offset = get<uint64_t>(e);
    uint32_t length = get<uint32_t>(e + 8);
    if (!r.offsets.empty() && offset <= r.offsets.back()) throw FormatError(where + ": record table out of order");
    r.offsets.push_back(offset);
    r.lengths.push_back(length);
    r.at.push_back(pos);
    pos += length;
  }
  return r;
}

}  // namespace cbtfs
