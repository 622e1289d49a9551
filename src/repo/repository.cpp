// Repository: header, VDI and point listing, verified record reads.
#include "cbtfs/repository.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "cbtfs/cached_storage.hpp"
#include "cbtfs/errors.hpp"
#include "cbtfs/s3_storage.hpp"

namespace cbtfs {

namespace {
constexpr const char* kHeaderKey = "cbtfs-repository";

std::string seq_name(uint32_t seq, const char* suffix) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08u%s", seq, suffix);
  return buf;
}

// "00000012.point" -> 12; 0 for anything else (temporaries, strangers).
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

uint32_t parse_point_name(const std::string& name) { return parse_seq(name, ".point"); }
uint32_t parse_pack_name(const std::string& name) { return parse_seq(name, ".pack"); }

std::unique_ptr<Storage> open_storage(const std::string& location) {
  return is_s3_url(location) ? open_s3_storage(s3_config_from_url(location)) : open_local_storage(location);
}

void Repository::init(const std::string& path) {
  if (!is_s3_url(path) && ::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST)
    throw StorageError("cannot create " + path + ": " + std::strerror(errno), errno);
  auto st = open_storage(path);
  if (st->size(kHeaderKey)) throw UsageError(path + " is already a cbtfs repository");
  if (!st->list("").empty()) throw UsageError(path + " is not empty; refusing to create a repository in it");
  st->put(kHeaderKey, encode_repo_header(random_uuid()));
}

// Records are small and S3 round trips are not: reads of a remote
// repository go through the chunk cache (verify, restore, ingest's parents).
std::shared_ptr<Repository> Repository::open(const std::string& path) {
  auto st = open_storage(path);
  if (is_s3_url(path)) st = make_cached_storage(std::move(st), CacheOptions{});
  return open(std::move(st));
}

std::shared_ptr<Repository> Repository::open(std::unique_ptr<Storage> st) {
  std::string where = st->describe();
  auto header = st->get(kHeaderKey);
  if (!header) throw UsageError(where + " is not a cbtfs repository (no " + kHeaderKey + " file; create one with 'cbtfs-repo init')");
  std::string id = check_repo_header(*header, where + "/" + kHeaderKey);
  return std::make_shared<Repository>(std::move(st), id);
}

Repository::Repository(std::unique_ptr<Storage> storage, std::string id) : storage_(std::move(storage)), id_(std::move(id)) {}

std::string Repository::journal_key(const std::string& vdi) { return "vdis/" + vdi + "/journal"; }

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

std::string Repository::point_key(const std::string& vdi, uint32_t seq) {
  return "vdis/" + vdi + "/points/" + seq_name(seq, ".point");
}
std::string Repository::pack_key(const std::string& vdi, uint32_t pack) {
  return "vdis/" + vdi + "/packs/" + seq_name(pack, ".pack");
}
std::string Repository::lock_key(const std::string& vdi) { return "vdis/" + vdi + "/lock"; }
std::string Repository::forgotten_key(const std::string& vdi, uint32_t seq) {
  return "vdis/" + vdi + "/forgotten/" + seq_name(seq, "");
}

// The claim comes first: a prune that removes the manifest after it must
// have seen it; one that removed it before is seen here.
std::unique_ptr<Claim> Repository::hold_point(const Manifest& m) {
  auto claim = storage_->claim_shared(point_key(m.vdi, m.seq));
  if (!claim || !storage_->size(point_key(m.vdi, m.seq))) return nullptr;
  return claim;
}

uint32_t Repository::highest_seq(const std::string& vdi) {
  uint32_t high = 0;
  for (auto& n : storage_->list("vdis/" + vdi + "/points")) high = std::max(high, parse_point_name(n));
  for (auto& n : storage_->list("vdis/" + vdi + "/forgotten"))
    if (n.size() == 8 && n.find_first_not_of("0123456789") == std::string::npos)
      high = std::max(high, static_cast<uint32_t>(std::stoul(n)));
  return high;
}

std::vector<std::string> Repository::vdis() {
  std::vector<std::string> out;
  for (auto& n : storage_->list("vdis"))
    if (is_uuid(n)) out.push_back(n);
  return out;
}

bool Repository::has_vdi(const std::string& vdi) { return is_uuid(vdi) && !storage_->list("vdis/" + vdi + "/points").empty(); }

// The manifest of one point, parsed once per process (they never change).
ManifestPtr Repository::manifest(const std::string& vdi, uint32_t seq) {
  {
    std::lock_guard g(mu_);
    if (auto it = manifests_.find({vdi, seq}); it != manifests_.end()) return it->second;
  }
  std::string where = storage_->describe() + "/" + point_key(vdi, seq);
  auto data = storage_->get(point_key(vdi, seq));
  if (!data) return nullptr;  // removed meanwhile
  auto m = std::make_shared<const Manifest>(decode_manifest(*data, where));
  if (m->vdi != vdi || m->seq != seq) throw FormatError(where + ": belongs to another VDI or point");
  std::lock_guard g(mu_);
  manifests_.emplace(std::make_pair(vdi, seq), m);
  return m;
}

PointList Repository::points(const std::string& vdi) {
  PointList out;
  if (!is_uuid(vdi)) return out;
  for (auto& name : storage_->list("vdis/" + vdi + "/points")) {
    uint32_t seq = parse_point_name(name);
    if (seq == 0) continue;
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
  auto names = storage_->list("vdis/" + vdi + "/points");
  for (auto it = names.rbegin(); it != names.rend(); ++it) {
    uint32_t seq = parse_point_name(*it);
    if (seq == 0) continue;
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

void Repository::read_record(const std::string& vdi, const BlockRef& ref, std::span<std::byte> out) {
  if (ref.length() == 0 || ref.length() > kBlockSize + 1024 || ref.offset < kPackHeaderSize)
    throw CorruptError("pack " + std::to_string(ref.pack) + " offset " + std::to_string(ref.offset) +
                       ": impossible record reference");
  Bytes stored(ref.length());
  std::string key = pack_key(vdi, ref.pack);
  try {
    storage_->read(key, ref.offset, stored);
    decode_record(stored, ref, out);
  } catch (const FormatError& e) {  // damaged or truncated: never data
    throw CorruptError(storage_->describe() + "/" + key + " offset " + std::to_string(ref.offset) + ": " + e.what());
  } catch (const StorageError& e) {
    if (e.error_number() == ENOENT) throw CorruptError(std::string(e.what()) + " (a pack file is missing)");
    throw;
  }
}

std::shared_ptr<const Bytes> Repository::node(const std::string& vdi, const BlockRef& ref, bool keep) {
  RecordKey k{intern(vdi), ref.pack, ref.offset, ref.hash};
  if (auto hit = nodes_.get(k)) return hit;
  auto n = std::make_shared<Bytes>(kNodeSize);
  read_record(vdi, ref, *n);
  if (keep) nodes_.put(k, n);
  return n;
}

void Repository::read_block(const std::string& vdi, const BlockRef& ref, std::span<std::byte> out, bool cache) {
  RecordKey k{intern(vdi), ref.pack, ref.offset, ref.hash};
  if (cache) {
    if (auto hit = blocks_.get(k)) {
      std::memcpy(out.data(), hit->data(), kBlockSize);
      return;
    }
  }
  read_record(vdi, ref, out);
  if (cache) blocks_.put(k, std::make_shared<Bytes>(out.begin(), out.end()));
}

}  // namespace cbtfs
