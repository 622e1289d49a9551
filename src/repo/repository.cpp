// Repository: header, VDI and point listing, verified record reads.
#include "cbtfs/repository.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "cbtfs/errors.hpp"
#include "cbtfs/layout.hpp"
#include "cbtfs/open_storage.hpp"
#include "cbtfs/point_list.hpp"
#include "repacked_pack.hpp"
#include "store_sink.hpp"

namespace cbtfs {

using namespace layout;

void Repository::init(const std::string& path, uint32_t format, const std::vector<Unlocker>& keys, Cipher cipher) {
  if (format < 1 || format > kFormatVersion) throw UsageError("there is no repository format " + std::to_string(format));
  if (!keys.empty() && format < 2) throw UsageError("encryption needs repository format 2");
  RepoHeader h;
  h.id = random_uuid();
  h.format = format;
  // The slots are made before anything is created: a key file too short
  // leaves no half-made repository behind.
  std::vector<KeySlot> slots;
  if (!keys.empty()) {
    RepoSecret secret = random_repo_secret();
    h.encrypted = true;
    h.cipher = cipher;
    for (auto& k : keys) slots.push_back(make_key_slot(secret, k, h.id));
  } else if (format >= 2) {
    h.id_key = random_id_key();
  }
  auto st = create_storage(path);
  if (st->size(kHeaderKey)) throw UsageError(path + " is already a cbtfs repository");
  if (!st->list("").empty()) throw UsageError(path + " is not empty; refusing to create a repository in it");
  for (auto& slot : slots) st->put(key_slot_key(random_slot_id()), encode_key_slot(slot));
  st->put(kHeaderKey, encode_repo_header(h));  // last: a repository exists with its keys
}

std::shared_ptr<Repository> Repository::open(const std::string& path) { return open(open_storage(path)); }

std::shared_ptr<Repository> Repository::open_without_key(const std::string& path) {
  return open(open_storage(path), {});
}

std::shared_ptr<Repository> Repository::open(std::unique_ptr<Storage> st,
                                             const std::function<std::vector<Unlocker>()>& keys) {
  std::string where = st->describe();
  auto header = st->get(kHeaderKey);
  if (!header) throw UsageError(where + " is not a cbtfs repository (no " + kHeaderKey + " file; create one with 'cbtfs-repo init')");
  RepoHeader h = check_repo_header(*header, where + "/" + kHeaderKey);
  // A plain header beside key slots was put there by someone who wants
  // the next backups stored in the clear.
  if (!h.encrypted && !st->list(kKeysDir).empty())
    throw FormatError(where + "/" + kHeaderKey + ": says the repository is not encrypted, but it has key slots (" +
                      kKeysDir + "/): the header was altered or replaced");
  auto repo = std::make_shared<Repository>(std::move(st), h);
  if (h.encrypted && keys) repo->unlock(keys());
  return repo;
}

std::map<std::string, KeySlot> Repository::key_slots() {
  std::map<std::string, KeySlot> out;
  for (auto& name : storage_->list(kKeysDir)) {
    if (!name.ends_with(".slot")) continue;
    std::string id = name.substr(0, name.size() - 5);
    auto data = storage_->get(key_slot_key(id));
    if (!data) continue;  // removed meanwhile
    out.emplace(id, decode_key_slot(*data, storage_->describe() + "/" + key_slot_key(id)));
  }
  return out;
}

std::string Repository::add_key_slot(const Unlocker& key) {
  if (!secret_) throw UsageError("the repository is not encrypted: it has no key slots");
  return put_key_slot(*secret_, key);
}

std::string Repository::put_key_slot(const RepoSecret& secret, const Unlocker& key) {
  std::string id = random_slot_id();
  storage_->put(key_slot_key(id), encode_key_slot(make_key_slot(secret, key, header_.id)));
  return id;
}

std::string Repository::recover_key_slot(const RepoSecret& secret, const Unlocker& key) {
  if (!header_.encrypted) throw UsageError("the repository is not encrypted: it has no key slots");
  // The recovery key's check binds it to this repository's id; a manifest
  // that opens says the secret is the one its data was sealed with (when
  // nothing is stored yet, there is nothing it could be wrong about).
  Sealer sealer(secret.data_key, header_.cipher);
  auto opens_a_point = [&] {
    bool any = false;
    for (auto& vdi : vdis())
      for (auto& name : storage_->list(points_dir(vdi))) {
        uint32_t seq = parse_point_name(name);
        auto data = seq ? storage_->get(point_key(vdi, seq)) : std::nullopt;
        if (!data) continue;
        any = true;
        try {
          open_manifest(sealer, *data, vdi, seq);
          return true;
        } catch (const CorruptError&) {  // damaged, or another key: another point says
        }
      }
    return !any;
  };
  if (!opens_a_point())
    throw KeyError(storage_->describe() + ": the recovery key opens none of the repository's points");
  return put_key_slot(secret, key);
}

void Repository::remove_key_slot(const std::string& id) {
  if (!secret_) throw UsageError("the repository is not encrypted: it has no key slots");
  auto slots = key_slots();
  if (!slots.count(id)) throw UsageError("there is no key slot " + id + " (cbtfs-repo key list shows them)");
  if (slots.size() == 1)
    throw UsageError("key slot " + id + " is the last one: without it nothing stored could be read; add another first");
  storage_->remove(key_slot_key(id));
}

Repository::Repository(std::unique_ptr<Storage> storage, RepoHeader header)
    : storage_(std::move(storage)), header_(std::move(header)) {}

void Repository::unlock(const std::vector<Unlocker>& keys) {
  std::string where = storage_->describe();
  if (keys.empty())
    throw KeyError(where + " is encrypted: give its passphrase or key file (CBTFS_PASSPHRASE_FILE, CBTFS_KEY_FILE, "
                   "or systemd credentials cbtfs-passphrase / cbtfs-key; see cbtfs-repo(1), ENCRYPTION)");
  auto slots = key_slots();
  if (slots.empty())
    throw FormatError(where + " is encrypted but has no key slots (" + kKeysDir +
                      "/ is empty): 'cbtfs-repo key import' makes one from the recovery key");
  std::string tried;
  for (auto& k : keys) {
    for (auto& [id, slot] : slots) {
      if (auto secret = open_key_slot(slot, k, header_.id)) {
        header_.id_key = secret->id_key;
        sealer_.emplace(secret->data_key, header_.cipher);
        secret_ = secret;
        opened_slot_ = id;
        return;
      }
    }
    tried += (tried.empty() ? "" : ", ") + k.source;
  }
  throw KeyError(where + " is encrypted and " + tried +
                 " opens none of its key slots (a wrong passphrase or key file; if it is forgotten, 'cbtfs-repo key "
                 "import' makes a new slot from the recovery key)");
}

Bytes Repository::encode_point(const Manifest& m) const {
  Bytes plain = encode_manifest(m);
  return sealer_ ? seal_manifest(*sealer_, plain, m.vdi, m.seq) : plain;
}

Repository::~Repository() = default;

StoreSink& Repository::store_sink() {
  std::lock_guard g(mu_);
  if (!sink_) sink_ = std::make_unique<StoreSink>(*storage_);
  return *sink_;
}

std::string Repository::store_sink_collection() {
  std::lock_guard g(mu_);
  return sink_collection_;
}

void Repository::set_store_sink_collection(const std::string& name) {
  std::lock_guard g(mu_);
  sink_collection_ = name;
}

std::string Repository::pack_key(const std::string& vdi, uint64_t pack) const {
  if (format() >= 2) return store_pack_key(pack);
  return layout::pack_key(vdi, static_cast<uint32_t>(pack));
}

void Repository::put_journal(const std::string& vdi, const std::string& text) {
  storage_->remove(journal_key(vdi));
  storage_->put(journal_key(vdi), std::as_bytes(std::span(text)));
}

std::optional<std::string> Repository::journal(const std::string& vdi) {
  auto b = storage_->get(journal_key(vdi));
  if (!b) return std::nullopt;
  return std::string(reinterpret_cast<const char*>(b->data()), b->size());
}

void Repository::clear_journal(const std::string& vdi) { storage_->remove(journal_key(vdi)); }

// The claim comes first: a prune that removes the manifest after it must
// have seen it; one that removed it before is seen here.
std::unique_ptr<Claim> Repository::hold_point(const Manifest& m) {
  auto claim = storage_->claim_shared(point_key(m.vdi, m.seq));
  if (!claim || !storage_->size(point_key(m.vdi, m.seq))) return nullptr;
  return claim;
}

uint32_t Repository::highest_seq(const std::string& vdi) {
  uint32_t high = 0;
  for (auto& n : storage_->list(points_dir(vdi))) high = std::max(high, parse_point_name(n));
  for (auto& n : storage_->list(forgotten_dir(vdi))) high = std::max(high, parse_forgotten_name(n));
  return high;
}

std::vector<std::string> Repository::vdis() {
  std::vector<std::string> out;
  for (auto& n : storage_->list(kVdisDir))
    if (is_uuid(n)) out.push_back(n);
  return out;
}

bool Repository::has_vdi(const std::string& vdi) { return is_uuid(vdi) && !storage_->list(points_dir(vdi)).empty(); }

// The manifest of one point, parsed once per process (they never change).
ManifestPtr Repository::manifest(const std::string& vdi, uint32_t seq) {
  {
    std::lock_guard g(mu_);
    if (auto it = manifests_.find({vdi, seq}); it != manifests_.end()) return it->second;
  }
  std::string where = storage_->describe() + "/" + point_key(vdi, seq);
  if (header_.encrypted && !sealer_) throw KeyError(where + ": the repository was opened without its key");
  auto data = storage_->get(point_key(vdi, seq));
  if (!data) return nullptr;  // removed meanwhile
  if (sealer_) {
    try {
      data = open_manifest(*sealer_, *data, vdi, seq);
    } catch (const CorruptError& e) {
      throw FormatError(where + ": " + e.what());
    }
  }
  auto m = std::make_shared<const Manifest>(decode_manifest(*data, where));
  if (m->vdi != vdi || m->seq != seq) throw FormatError(where + ": belongs to another VDI or point");
  if (m->format != format())
    throw FormatError(where + ": a point of format " + std::to_string(m->format) + " in a repository of format " +
                      std::to_string(format()));
  std::lock_guard g(mu_);
  manifests_.emplace(std::make_pair(vdi, seq), m);
  return m;
}

// A manifest the sealed point list does not allow is left out: a pruned
// point put back by someone who can write the storage is not offered, even
// though its manifest opens. The list is read before the manifests are
// listed, so a commit or prune meanwhile shows its points as they were or
// as they are, never as this.
static std::string unlisted(const std::string& vdi, uint32_t seq) {
  return "VDI " + vdi + ": point " + std::to_string(seq) +
         " is not in the sealed point list: a pruned point put back by something other than cbtfs. It is left out; "
         "cbtfs-repo verify tells more";
}

PointList Repository::points(const std::string& vdi) {
  PointList out;
  if (!is_uuid(vdi)) return out;
  auto listed = read_listed_points(*this, vdi);
  for (auto& name : storage_->list(points_dir(vdi))) {
    uint32_t seq = parse_point_name(name);
    if (seq == 0) continue;
    if (listed && !listed->allows(seq)) {
      out.errors.push_back(unlisted(vdi, seq));
      continue;
    }
    // A damaged manifest is reported and skipped; an I/O error is not
    // damage, and the caller must not act on a partial list: it propagates.
    try {
      if (auto m = manifest(vdi, seq)) out.points.push_back(std::move(m));
    } catch (const FormatError& e) {
      out.errors.push_back(e.what());
    }
  }
  return out;
}

// Only the newest readable manifest: on an object store, reading every
// manifest of a long chain at each backup would cost a request per point.
ManifestPtr Repository::latest(const std::string& vdi) {
  if (!is_uuid(vdi)) return nullptr;
  auto listed = read_listed_points(*this, vdi);
  auto names = storage_->list(points_dir(vdi));
  for (auto it = names.rbegin(); it != names.rend(); ++it) {
    uint32_t seq = parse_point_name(*it);
    if (seq == 0 || (listed && !listed->allows(seq))) continue;
    try {
      if (auto m = manifest(vdi, seq)) return m;
    } catch (const FormatError&) {
      // A damaged newest manifest: the one before it is the latest point.
    }
  }
  return nullptr;
}

std::string holder_text(const std::string& program) {
  char host[256] = "?";
  gethostname(host, sizeof host - 1);
  return program + ", pid " + std::to_string(getpid()) + " on " + host;
}

std::unique_ptr<StorageLock> Repository::lock_vdi(const std::string& vdi, const std::string& holder) {
  auto lock = storage_->try_lock(lock_key(vdi), holder);
  if (lock) return lock;
  // The holder writes its name just after locking; give it a moment.
  std::string who;
  for (int i = 0; i < 10 && who.empty(); ++i) {
    if (i) ::usleep(20000);
    who = storage_->lock_holder(lock_key(vdi));
  }
  throw LockedError("VDI " + vdi + " is being written by another process" + (who.empty() ? "" : " (" + who + ")") +
                    "; try again when it has finished");
}

void Repository::forget_point(const std::string& vdi, uint32_t seq) {
  std::lock_guard g(mu_);
  manifests_.erase({vdi, seq});
}

const void* Repository::intern(const std::string& vdi) {
  std::lock_guard g(mu_);
  auto& slot = interned_[vdi];
  if (!slot) slot = std::make_unique<std::string>(vdi);
  return slot.get();
}

namespace {

constexpr uint32_t kMaxStored = kBlockSize + 1024;  // a record's largest stored length, seal included

void check_reference(const BlockRef& ref, uint32_t format) {
  if (ref.length() == 0 || ref.length() > kMaxStored || ref.offset < pack_header_size(format))
    throw CorruptError("pack " + std::to_string(ref.pack) + " offset " + std::to_string(ref.offset) +
                       ": impossible record reference");
}

}  // namespace

Repository::Place Repository::read_stored(const std::string& vdi, const BlockRef& ref, std::span<std::byte> into) {
  check_reference(ref, format());
  if (into.size() != ref.length()) throw std::logic_error("read_stored: the buffer is not the record's length");
  Place p{pack_key(vdi, ref.pack), ref.offset};
  // Where a rewritten pack keeps the record now (the reference keeps the
  // offset it was written at).
  auto place = [&](const RepackedPack& moved) {
    p.key = store_repacked_key(ref.pack, moved.generation);
    auto found = moved.find(ref.offset, ref.length());
    if (!found)
      throw FormatError("not among the records a collection kept in generation " + std::to_string(moved.generation));
    p.offset = *found;
  };
  try {
    try {
      if (format() >= 2 && any_repacked_)
        if (auto moved = repacked(ref.pack, false)) place(*moved);
      storage_->read(p.key, p.offset, into);
    } catch (const StorageError& e) {
      if (e.error_number() != ENOENT || format() < 2) throw;
      auto moved = repacked(ref.pack, true);  // rewritten since it was last found
      if (!moved) throw;
      place(*moved);
      storage_->read(p.key, p.offset, into);
    }
  } catch (const FormatError& e) {
    throw CorruptError(storage_->describe() + "/" + p.key + " offset " + std::to_string(p.offset) + ": " + e.what());
  } catch (const StorageError& e) {
    if (e.error_number() == ENOENT) throw CorruptError(std::string(e.what()) + " (a pack file is missing)");
    throw;
  }
  return p;
}

void Repository::read_record(const std::string& vdi, const BlockRef& ref, std::span<std::byte> out, bool check_stored) {
  if (header_.encrypted && !sealer_) throw KeyError(storage_->describe() + ": the repository was opened without its key");
  // A record stored raw is read where it goes; a compressed one into this
  // thread's buffer, which is never cleared (it is read over at once).
  thread_local Bytes buffer(kMaxStored);
  check_reference(ref, format());
  std::span<std::byte> stored =
      ref.raw() && ref.length() == out.size() ? out : std::span<std::byte>(buffer).first(ref.length());
  Place p = read_stored(vdi, ref, stored);
  try {
    if (check_stored && ref.stored_check && stored_check(stored) != ref.stored_check)
      throw FormatError("the stored bytes differ from their checksum");
    if (sealer_)
      open_record(*sealer_, stored, ref, out);
    else
      decode_record(stored, ref, out);
  } catch (const FormatError& e) {  // damaged or truncated: never data
    throw CorruptError(storage_->describe() + "/" + p.key + " offset " + std::to_string(p.offset) + ": " + e.what());
  }
}

std::shared_ptr<const RepackedPack> Repository::repacked(uint64_t pack, bool look) {
  if (!look) {
    std::lock_guard g(mu_);
    auto it = repacked_.find(pack);
    return it == repacked_.end() ? nullptr : it->second;
  }
  // A collection may rewrite it again between the listing and the read.
  for (int attempt = 0;; ++attempt) {
    uint32_t newest = 0;
    for (auto& name : storage_->list(store_pack_dir(pack)))
      if (auto f = parse_store_pack_file(name); f && f->pack == pack) newest = std::max(newest, f->generation);
    if (!newest) return nullptr;
    try {
      auto r = std::make_shared<const RepackedPack>(
          read_repacked_pack(*storage_, store_repacked_key(pack, newest), pack));
      std::lock_guard g(mu_);
      repacked_[pack] = r;
      any_repacked_ = true;
      return r;
    } catch (const StorageError& e) {
      if (e.error_number() != ENOENT || attempt == 3) throw;
    }
  }
}

void Repository::check_pack(const std::string& vdi, uint64_t pack) {
  Bytes h(pack_header_size(format()));
  std::string key = pack_key(vdi, pack);
  try {
    storage_->read(key, 0, h);
  } catch (const StorageError& e) {
    if (e.error_number() != ENOENT || format() < 2) throw;
    if (!repacked(pack, true)) throw CorruptError(std::string(e.what()) + " (a pack file is missing)");
    return;  // its header and record table were checked
  }
  check_pack_header(h, pack, format(), storage_->describe() + "/" + key);
}

std::shared_ptr<const Bytes> Repository::node(const std::string& vdi, const BlockRef& ref, bool keep) {
  RecordKey k{format() >= 2 ? nullptr : intern(vdi), ref.pack, ref.offset, ref.hash};
  if (auto hit = nodes_.get(k)) return hit;
  auto n = std::make_shared<Bytes>(node_size(format()));
  read_record(vdi, ref, *n);
  if (keep) nodes_.put(k, n);
  return n;
}

std::shared_ptr<const std::byte[]> Repository::cached_block(const std::string& vdi, const BlockRef& ref) {
  RecordKey k{format() >= 2 ? nullptr : intern(vdi), ref.pack, ref.offset, ref.hash};
  if (auto hit = blocks_.get(k)) return hit;
  // Not zeroed first: read_record fills all of it or throws. Zeroing 64 KiB
  // per small random read was 6 % of the mount's CPU.
  auto b = std::make_shared_for_overwrite<std::byte[]>(kBlockSize);
  read_record(vdi, ref, {b.get(), kBlockSize});
  blocks_.put(k, b);
  return b;
}

}  // namespace cbtfs
