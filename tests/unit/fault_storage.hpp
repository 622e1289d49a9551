// A Storage that fails on purpose: the Nth operation (counting every read,
// get, size, list, create, append, commit, remove and lock) throws the
// StorageError a full disk or a dying disk would give. A fault no real part
// can produce on demand at an exact step, hence this stand-in.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

#include "cbtfs/errors.hpp"
#include "cbtfs/storage.hpp"

namespace cbtfs::test {

class FaultStorage final : public Storage {
 public:
  // fail_at = 0: never fails, only counts.
  FaultStorage(std::unique_ptr<Storage> inner, uint64_t fail_at, int err)
      : inner_(std::move(inner)), fail_at_(fail_at), err_(err) {}

  uint64_t operations() const { return ops_; }
  // Frees no ranges of objects, as an object store (S3) cannot.
  void keep_ranges() { keep_ranges_ = true; }
  // Asks for this many requests in flight at once, as S3 does.
  void set_parallelism(unsigned n) { parallelism_ = n; }
  unsigned parallelism() const override { return parallelism_; }
  void fail_at(uint64_t n) { fail_at_ = n; }
  bool fired() const { return fired_; }

  void step(const char* what) {
    if (++ops_ == fail_at_) {
      fired_ = true;
      throw StorageError(std::string("injected: ") + what + ": " + std::strerror(err_), err_);
    }
  }

  void read(const std::string& key, uint64_t offset, std::span<std::byte> out) override {
    step("read");
    inner_->read(key, offset, out);
  }
  std::optional<Bytes> get(const std::string& key) override {
    step("get");
    return inner_->get(key);
  }
  std::optional<uint64_t> size(const std::string& key) override {
    step("size");
    return inner_->size(key);
  }
  std::vector<std::string> list(const std::string& prefix) override {
    step("list");
    return inner_->list(prefix);
  }
  std::unique_ptr<ObjectWriter> create(const std::string& key) override {
    step("create");
    return std::make_unique<Writer>(*this, inner_->create(key));
  }
  void remove(const std::string& key) override {
    step("remove");
    inner_->remove(key);
  }
  void remove_temporaries(const std::string& prefix) override {
    step("remove_temporaries");
    inner_->remove_temporaries(prefix);
  }
  std::unique_ptr<StorageLock> try_lock(const std::string& key, const std::string& holder) override {
    step("lock");
    return inner_->try_lock(key, holder);
  }
  uint64_t discard(const std::string& key, uint64_t offset, uint64_t length) override {
    step("discard");
    return keep_ranges_ ? 0 : inner_->discard(key, offset, length);
  }
  uint64_t discardable(const std::string& key, uint64_t offset, uint64_t length) override {
    return keep_ranges_ ? 0 : inner_->discardable(key, offset, length);
  }
  std::vector<std::string> unfinished(const std::string& prefix) override {
    step("unfinished");
    return inner_->unfinished(prefix);
  }
  void drop_unfinished(const std::string& key) override {
    step("drop_unfinished");
    inner_->drop_unfinished(key);
  }
    std::string describe() const override { return inner_->describe(); }

 private:
  // A write that fails part-way: some of the bytes went in, then the error.
  class Writer final : public ObjectWriter {
   public:
    Writer(FaultStorage& s, std::unique_ptr<ObjectWriter> w) : s_(s), w_(std::move(w)) {}
    void append(std::span<const std::byte> data) override {
      try {
        s_.step("append");
      } catch (...) {
        w_->append(data.first(data.size() / 2));
        throw;
      }
      w_->append(data);
    }
    uint64_t size() const override { return w_->size(); }
    void commit() override {
      s_.step("commit");
      w_->commit();
    }

   private:
    FaultStorage& s_;
    std::unique_ptr<ObjectWriter> w_;
  };

  std::unique_ptr<Storage> inner_;
  uint64_t fail_at_;
  int err_;
  std::atomic<uint64_t> ops_{0};
  bool fired_ = false;
  bool keep_ranges_ = false;
  unsigned parallelism_ = 1;
};

}  // namespace cbtfs::test
