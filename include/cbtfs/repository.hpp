// The backup repository: VDIs, their points, and the record store below them.
// Where each lives is cbtfs/layout.hpp. A point exists exactly when its
// manifest exists; the manifest is written last, after its pack is durable.
// Anything else is invisible garbage that the next writer of that VDI removes.
// Reading a point is cbtfs/point_reader.hpp, writing one cbtfs/point_writer.hpp.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/key_slots.hpp"
#include "cbtfs/seal.hpp"
#include "cbtfs/lru_cache.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs {

class StoreSink;
struct RepackedPack;
using ManifestPtr = std::shared_ptr<const Manifest>;

struct PointList {
  std::vector<ManifestPtr> points;  // by seq, oldest first
  std::vector<std::string> errors;  // manifests that could not be read
};

class Repository {
 public:
  // Creates the repository directory (mode 0700) and its header. With
  // keys, the repository is encrypted (format 2): one key slot per key,
  // everything stored sealed with cipher.
  static void init(const std::string& path, uint32_t format = 1, const std::vector<Unlocker>& keys = {},
                   Cipher cipher = Cipher::aes256_ocb);
  // Opens and checks the header; throws FormatError/VersionError/StorageError.
  // An encrypted repository is opened with what unlockers_from_environment()
  // finds (KeyError when nothing there opens a slot).
  static std::shared_ptr<Repository> open(const std::string& path);
  // Opens an encrypted repository without its key: only what is stored can
  // be checked (verify_stored); reading a point throws KeyError.
  static std::shared_ptr<Repository> open_without_key(const std::string& path);
  // The same over a storage already opened (the mount puts a cache in front).
  // keys: what may open an encrypted repository (called only for one);
  // an empty function leaves it locked, as open_without_key does.
  static std::shared_ptr<Repository> open(std::unique_ptr<Storage> storage,
                                          const std::function<std::vector<Unlocker>()>& keys = unlockers_from_environment);
  explicit Repository(std::unique_ptr<Storage> storage, RepoHeader header = {});
  ~Repository();

  Storage& storage() { return *storage_; }
  // The uuid from the header ("" for repositories created without one).
  const std::string& id() const { return header_.id; }
  uint32_t format() const { return header_.format; }
  // Format 2: the key of block_id().
  const IdKey& id_key() const { return header_.id_key; }
  // An encrypted repository's seals of records and manifests; nullptr
  // for a plain one.
  const Sealer* sealer() const { return sealer_ ? &*sealer_ : nullptr; }
  Cipher cipher() const { return header_.cipher; }
  bool encrypted() const { return header_.encrypted; }
  // An encrypted repository's key slots by id; which one opened it.
  std::map<std::string, KeySlot> key_slots();
  const std::string& opened_slot() const { return opened_slot_; }
  // A new slot that key opens (the repository must be open); its id.
  std::string add_key_slot(const Unlocker& key);
  // The secret the slots hold, once one opened (key export); else nullptr.
  const RepoSecret* secret() const { return secret_ ? &*secret_ : nullptr; }
  // A new slot, opened by key, for a secret typed back from a recovery
  // key (the repository may be locked: every slot may be lost). Refuses a
  // secret that does not open the repository's points.
  std::string recover_key_slot(const RepoSecret& secret, const Unlocker& key);
  // Refuses to remove the last slot.
  void remove_key_slot(const std::string& id);
  // A manifest as stored (sealed in an encrypted repository).
  Bytes encode_point(const Manifest& m) const;
  // The key of the pack a record of the VDI lives in: the VDI's own pack
  // (format 1) or the shared store's (format 2).
  std::string pack_key(const std::string& vdi, uint64_t pack) const;
  // Format 2: where this process's point writers append records, together
  // (store_sink.hpp).
  StoreSink& store_sink();
  // The last collection the sink's records are known to have outlived.
  std::string store_sink_collection();
  void set_store_sink_collection(const std::string& name);
  std::vector<std::string> vdis();
  bool has_vdi(const std::string& vdi);
  // Manifests are immutable, so they are parsed once and kept. In an
  // encrypted repository, a point its sealed point list does not allow (a
  // pruned one put back) is left out: an error in points(), skipped by latest().
  PointList points(const std::string& vdi);
  ManifestPtr latest(const std::string& vdi);
  // nullptr when the point does not exist; throws FormatError when damaged.
  ManifestPtr manifest(const std::string& vdi, uint32_t seq);

  // Reads and verifies one record. Index nodes are cached (they are few and
  // hot). keep=false: a one-off read (a scan of many points) that would only
  // push hot nodes out; it still uses a node already cached.
  std::shared_ptr<const Bytes> node(const std::string& vdi, const BlockRef& ref, bool keep = true);
  // check_stored: also compare the stored bytes with ref.stored_check
  // (verify does; a read's seal or XXH3 is the check that matters).
  void read_record(const std::string& vdi, const BlockRef& ref, std::span<std::byte> out, bool check_stored = false);
  // Reads a record's bytes as stored (sealed, compressed) into `into`
  // (ref.length() bytes), wherever a collection moved them; returns where
  // they were. Checks nothing but that they are there.
  struct Place {
    std::string key;
    uint64_t offset;
  };
  Place read_stored(const std::string& vdi, const BlockRef& ref, std::span<std::byte> into);
  // A data block through a small cache, for reads of parts of blocks (a file
  // system's 4 KiB reads of one block come one after the other).
  std::shared_ptr<const std::byte[]> cached_block(const std::string& vdi, const BlockRef& ref);
  // Checks that a pack the VDI references is there and is what its name
  // says (its header; a rewritten one's record table). Throws as reads do.
  void check_pack(const std::string& vdi, uint64_t pack);

  // Registers a reader of the point (a claim on its manifest) until the
  // returned claim goes: prune keeps a point that is being read. nullptr
  // when the point is gone or being removed.
  std::unique_ptr<Claim> hold_point(const Manifest& m);
  // The highest point number the VDI has ever used (0: none).
  uint32_t highest_seq(const std::string& vdi);

  // A small text a writer keeps beside a VDI's points while it holds the
  // VDI's lock: what the next writer must clean up should this one die.
  // Opaque to the repository; durable when put_journal returns.
  void put_journal(const std::string& vdi, const std::string& text);
  std::optional<std::string> journal(const std::string& vdi);
  void clear_journal(const std::string& vdi);

  // The VDI's writer lock, held until the returned object goes; throws
  // LockedError naming the holder. holder says who we are (see holder_text).
  std::unique_ptr<StorageLock> lock_vdi(const std::string& vdi, const std::string& holder);

  // Drops cached manifests of points that no longer exist (after prune).
  void forget_point(const std::string& vdi, uint32_t seq);

 private:
  // A cached record is known by where it is and by its checksum: a place
  // that ever held other bytes can never answer for them.
  struct RecordKey {
    const void* vdi;  // interned per VDI by the Repository; nullptr in format 2 (one store)
    uint64_t pack;
    uint64_t offset;
    uint64_t hash;
    bool operator==(const RecordKey&) const = default;
  };
  struct RecordKeyHash {
    size_t operator()(const RecordKey& k) const noexcept {
      return std::hash<const void*>()(k.vdi) ^ (std::hash<uint64_t>()(k.offset) * 31 + k.pack) ^ k.hash;
    }
  };

  const void* intern(const std::string& vdi);
  // Format 2: the rewrite of a pack a collection made (repacked_pack.hpp),
  // as this process last found it; look=true looks again (after its key
  // went). nullptr when the pack was never rewritten.
  std::shared_ptr<const RepackedPack> repacked(uint64_t pack, bool look);

  // An encrypted repository's keys from the first slot one of keys opens.
  void unlock(const std::vector<Unlocker>& keys);
  // Writes a new slot holding secret, opened by key; its id.
  std::string put_key_slot(const RepoSecret& secret, const Unlocker& key);

  std::unique_ptr<Storage> storage_;
  RepoHeader header_;
  std::optional<Sealer> sealer_;
  std::optional<RepoSecret> secret_;  // encrypted: what new key slots hold
  std::string opened_slot_;
  std::unique_ptr<StoreSink> sink_;  // declared after storage_: it goes first
  std::string sink_collection_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<std::string>> interned_;
  std::map<std::pair<std::string, uint32_t>, ManifestPtr> manifests_;
  std::map<uint64_t, std::shared_ptr<const RepackedPack>> repacked_;
  std::atomic<bool> any_repacked_{false};  // spares reads of packs never rewritten the lock
  LruCache<RecordKey, Bytes, RecordKeyHash> nodes_{1024};   // 24 MiB at most
  LruCache<RecordKey, std::byte[], RecordKeyHash> blocks_{64};  // 4 MiB of kBlockSize blocks
};

// "<program>, pid N on HOST": what a second writer is told about the first.
std::string holder_text(const std::string& program);

}  // namespace cbtfs
