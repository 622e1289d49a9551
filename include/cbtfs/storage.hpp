// The narrow interface through which the repository reaches its bytes.
// Keys are relative '/'-separated names ("vdis/<uuid>/points/00000001.point").
// Everything the repository guarantees (atomic commit, one writer per VDI)
// rests on three promises made here:
//   - an object created with create() is invisible under its key until
//     commit() returns, and durable once it has returned;
//   - objects are never modified after commit, only removed, or have byte
//     ranges that nothing references any more discarded;
//   - try_lock() gives one holder at a time and is released when the
//     holder dies.
// A local directory implements it with rename/fsync/flock; an object store
// with conditional PUTs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace cbtfs {

using Bytes = std::vector<std::byte>;

class ObjectWriter {
 public:
  virtual ~ObjectWriter() = default;  // without commit(): discarded
  virtual void append(std::span<const std::byte> data) = 0;
  // The same, taking ownership, so the bytes need not be copied again.
  virtual void append(Bytes&& data) { append(std::span<const std::byte>(data)); }
  virtual uint64_t size() const = 0;
  // Makes the object durable and visible under its key. Fails if it exists.
  virtual void commit() = 0;
};

class StorageLock {
 public:
  virtual ~StorageLock() = default;
  // Throws LockedError when the lock is lost (a lease that another writer
  // took over); writers call it right before they commit.
  virtual void check() {}
};

// A claim on a key, held until the object goes: readers share one on a
// point they read, and whoever removes the point needs it alone.
class Claim {
 public:
  virtual ~Claim() = default;
  // False for an exclusive claim on a storage that cannot shut out new
  // readers at once (S3: readers announce themselves with lease objects);
  // alone() then tells whether one came since it was granted.
  virtual bool exact() const { return true; }
  virtual bool alone() { return true; }
};

class Storage {
 public:
  virtual ~Storage() = default;

  // Reads exactly out.size() bytes at offset; throws StorageError on I/O
  // errors and FormatError when the object is shorter than asked.
  virtual void read(const std::string& key, uint64_t offset, std::span<std::byte> out) = 0;
  // Whole small object, or nullopt when it does not exist.
  virtual std::optional<Bytes> get(const std::string& key) = 0;
  virtual std::optional<uint64_t> size(const std::string& key) = 0;
  // Committed names directly below prefix ("vdis"), sorted; empty when none.
  virtual std::vector<std::string> list(const std::string& prefix) = 0;
  virtual std::unique_ptr<ObjectWriter> create(const std::string& key) = 0;
  void put(const std::string& key, std::span<const std::byte> data) {
    auto w = create(key);
    w->append(data);
    w->commit();
  }
  // Durable when it returns; removing what does not exist is no error.
  virtual void remove(const std::string& key) = 0;
  // Gives back the space of a byte range of an object that no reader will
  // ever ask for again (offsets of the rest unchanged); returns the bytes
  // freed, 0 where the storage cannot. discardable() says it without doing it.
  virtual uint64_t discard(const std::string& /*key*/, uint64_t /*offset*/, uint64_t /*length*/) { return 0; }
  virtual uint64_t discardable(const std::string& /*key*/, uint64_t /*offset*/, uint64_t /*length*/) { return 0; }
  // Removes what dead writers left under prefix (objects never committed).
  // Only safe while holding the lock that guards that prefix.
  virtual void remove_temporaries(const std::string& prefix) = 0;
  // How many of those are left by writers that are gone (a running writer's
  // are not leftovers); 0 where the storage cannot tell.
  virtual size_t leftovers(const std::string& /*prefix*/) { return 0; }
  // For a prefix that many writers share (format 2's store), where no one
  // lock says who may clean up: the keys of objects below prefix, at any
  // depth, that writers began and never committed, leaving out those whose
  // writer is known to be running (S3 cannot tell: it lists them all).
  virtual std::vector<std::string> unfinished(const std::string& /*prefix*/) { return {}; }
  // Drops what was written of key and never committed; the caller knows
  // its writer is gone.
  virtual void drop_unfinished(const std::string& /*key*/) {}
  // nullptr when someone else holds it; holder() then says who, if known.
  virtual std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) = 0;
  // Who holds the lock key, as try_lock's holder said: the lock object's
  // first line ("" when free or unknown).
  std::string lock_holder(const std::string& key) {
    auto b = get(key);
    if (!b) return {};
    std::string s(reinterpret_cast<const char*>(b->data()), b->size());
    return s.substr(0, s.find_first_of(std::string("\n\0", 2)));
  }
  // Claims on an existing object: shared ones (readers) exclude an
  // exclusive one (a remover) and the reverse; nullptr when the other kind
  // holds it or the object is gone. A storage that cannot tell grants both
  // (no protection; see cbtfs-s3(7)).
  virtual std::unique_ptr<Claim> claim_shared(const std::string& /*key*/) { return std::make_unique<Claim>(); }
  virtual std::unique_ptr<Claim> claim_exclusive(const std::string& /*key*/) { return std::make_unique<Claim>(); }
  // How many requests are worth having in flight at once: an object store
  // answers each after a round trip; a local directory at once.
  virtual unsigned parallelism() const { return 1; }
  // A human name for messages ("/srv/backup").
  virtual std::string describe() const = 0;
};

}  // namespace cbtfs
