// verify_stored: checks what is stored against the checksums kept beside
// it, with no key: manifests, index segments, packs and their records.
#include <map>
#include <set>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/seal.hpp"
#include "cbtfs/verify.hpp"
#include "dedup_index.hpp"

namespace cbtfs {

namespace {

void check_manifests(Repository& repo, StoredReport& r) {
  auto& st = repo.storage();
  for (auto& vdi : repo.vdis())
    for (auto& name : st.list(layout::points_dir(vdi))) {
      uint32_t seq = layout::parse_point_name(name);
      if (!seq) continue;
      std::string key = layout::point_key(vdi, seq), where = st.describe() + "/" + key;
      auto data = st.get(key);
      if (!data) continue;  // removed meanwhile
      ++r.manifests;
      r.bytes_read += data->size();
      if (!repo.encrypted()) {
        try {
          decode_manifest(*data, where);  // its signature is its checksum
        } catch (const FormatError& e) {
          r.problems.push_back(e.what());
        }
        continue;
      }
      if (!is_framed(*data))
        ++r.unframed;
      else if (!sealed_frame_intact(*data))
        r.problems.push_back(where + ": damaged (its stored checksum differs)");
    }
  if (repo.encrypted())
    for (auto& vdi : repo.vdis())
      for (auto& name : st.list(layout::lists_dir(vdi))) {
        uint32_t g = layout::parse_point_list_name(name);
        auto data = g ? st.get(layout::point_list_key(vdi, g)) : std::nullopt;
        if (data && !sealed_frame_intact(*data))
          r.problems.push_back(st.describe() + "/" + layout::point_list_key(vdi, g) +
                               ": damaged (its stored checksum differs)");
      }
}

// Every record some segment lists, once, by pack and offset.
std::map<std::pair<uint64_t, uint64_t>, BlockRef> indexed_records(Repository& repo, StoredReport& r) {
  auto& st = repo.storage();
  std::map<std::pair<uint64_t, uint64_t>, BlockRef> records;
  for (auto& name : st.list(layout::kStoreIndexDir)) {
    uint64_t id = layout::parse_store_index_name(name);
    if (!id) continue;
    std::string key = layout::store_index_key(id);
    ++r.segments;
    try {
      uint64_t pack = 0;
      for (auto& ref : read_index_segment(st, key, pack)) records.emplace(std::make_pair(ref.pack, ref.offset), ref);
    } catch (const StorageError& e) {
      if (e.error_number() != ENOENT) throw;
      --r.segments;  // merged and removed by a collection meanwhile
    } catch (const FormatError& e) {
      r.problems.push_back(st.describe() + "/" + key + ": " + e.what());
    }
  }
  return records;
}

std::set<uint64_t> stored_packs(Storage& st) {
  std::set<uint64_t> packs;
  for (auto& dir : st.list(layout::kStorePacksDir))
    for (auto& n : st.list(std::string(layout::kStorePacksDir) + "/" + dir))
      if (auto f = layout::parse_store_pack_file(n)) packs.insert(f->pack);
  return packs;
}

}  // namespace

StoredReport verify_stored(Repository& repo, const std::function<void(uint64_t)>& progress) {
  if (repo.format() < 2) throw UsageError("a format 1 repository keeps no stored checksums apart: verify it whole");
  StoredReport r;
  check_manifests(repo, r);
  auto records = indexed_records(repo, r);
  Bytes buf(kBlockSize + 1024);
  uint64_t pack = 0;
  bool pack_ok = false;
  for (auto& [where, ref] : records) {
    if (ref.pack != pack) {
      pack = ref.pack;
      ++r.packs;
      try {
        repo.check_pack("", pack);
        pack_ok = true;
      } catch (const FormatError& e) {
        pack_ok = false;
        r.problems.push_back(std::string("pack ") + e.what());
      }
    }
    if (!pack_ok) continue;
    try {
      if (ref.length() > buf.size()) throw CorruptError("impossible record length " + std::to_string(ref.length()));
      auto stored = std::span<std::byte>(buf).first(ref.length());
      auto place = repo.read_stored("", ref, stored);
      ++r.records;
      r.bytes_read += stored.size();
      if (!ref.stored_check)
        ++r.unrecorded;
      else if (stored_check(stored) != ref.stored_check)
        r.problems.push_back(repo.storage().describe() + "/" + place.key + " offset " + std::to_string(place.offset) +
                             ": record damaged (its stored checksum differs)");
    } catch (const CorruptError& e) {
      r.problems.push_back(e.what());
    }
    if (progress) progress(r.bytes_read);
  }
  std::set<uint64_t> listed;
  for (auto& [where, ref] : records) listed.insert(ref.pack);
  uint64_t unlisted = 0;
  for (uint64_t p : stored_packs(repo.storage())) unlisted += !listed.count(p);
  if (unlisted)
    r.warnings.push_back(std::to_string(unlisted) +
                         " pack(s) that no index segment lists (written by an interrupted writer, or whose segment was "
                         "lost): their records are checked only with the key");
  return r;
}

}  // namespace cbtfs
