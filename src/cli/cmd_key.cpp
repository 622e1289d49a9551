// cbtfs-repo key list|add|change|remove|export|import: an encrypted
// repository's keys. The repository is opened (so unlocked) first: only
// someone who can read it may add a way in, or take one away. import is
// the exception: it is for when nothing opens it any more, and the
// recovery key is the proof.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>

#include "cbtfs/errors.hpp"
#include "cbtfs/exit_codes.hpp"
#include "cbtfs/key_slots.hpp"
#include "cbtfs/recovery_key.hpp"
#include "commands.hpp"

namespace cbtfs {

namespace {

std::shared_ptr<Repository> open_encrypted(const std::string& path) {
  auto repo = open_repository(path);
  if (!repo->sealer()) throw UsageError(path + " is not encrypted: it has no key slots");
  return repo;
}

Unlocker new_key(const KeyArgs& a) {
  if (a.new_passphrase_file.empty() == a.new_key_file.empty())
    throw UsageError("key " + a.action + ": give the new --new-passphrase-file FILE or --new-key-file FILE (one)");
  return read_unlocker(a.new_passphrase_file, a.new_key_file);
}

const char* kind_of(const KeyArgs& a) { return a.new_key_file.empty() ? "passphrase" : "keyfile"; }

std::string read_recovery_key(const std::string& file) {
  keep_secrets_out_of_core_dumps();
  if (file.empty() || file == "-") {
    if (isatty(0)) std::fprintf(stderr, "Type or paste the recovery key, then Ctrl-D:\n");
    return {std::istreambuf_iterator<char>(std::cin), {}};
  }
  std::ifstream in(file);
  if (!in) throw UsageError("cannot read the recovery key file " + file);
  return {std::istreambuf_iterator<char>(in), {}};
}

int import_key(const KeyArgs& a) {
  Unlocker u = new_key(a);
  auto repo = open_repository(a.repo, false);
  if (!repo->encrypted()) throw UsageError(a.repo + " is not encrypted: it has no keys");
  RepoSecret secret = parse_recovery_key(read_recovery_key(a.recovery_file), repo->id());
  std::string id = repo->recover_key_slot(secret, u);
  std::printf("added key slot %s (%s) from the recovery key\n", id.c_str(), kind_of(a));
  return kExitOk;
}

}  // namespace

int cmd_key(const KeyArgs& a) {
  if (a.action == "import") return import_key(a);
  auto repo = open_encrypted(a.repo);
  if (a.action == "list") {
    for (auto& [id, slot] : repo->key_slots()) {
      std::printf("%s  %-10s", id.c_str(), slot.kind.c_str());
      if (slot.kind == "passphrase")
        std::printf("  scrypt N=%llu r=%u p=%u", static_cast<unsigned long long>(slot.n), slot.r, slot.p);
      std::printf("%s\n", id == repo->opened_slot() ? "  (opened this time)" : "");
    }
    return kExitOk;
  }
  if (a.action == "add") {
    std::string id = repo->add_key_slot(new_key(a));
    std::printf("added key slot %s (%s)\n", id.c_str(), kind_of(a));
    return kExitOk;
  }
  if (a.action == "change") {
    // The new slot first: were the command stopped in between, both open it.
    std::string id = repo->add_key_slot(new_key(a)), old = repo->opened_slot();
    repo->remove_key_slot(old);
    std::printf("key slot %s replaced by %s (%s)\n", old.c_str(), id.c_str(), kind_of(a));
    return kExitOk;
  }
  if (a.action == "export") {
    std::fputs(format_recovery_key(*repo->secret(), repo->id(), a.paper).c_str(), stdout);
    if (isatty(1))
      std::fprintf(stderr, "Anyone with this key and the backups reads them: keep it apart from them. "
                           "'cbtfs-repo key import' makes a new key slot from it.\n");
    return kExitOk;
  }
  repo->remove_key_slot(a.slot);
  std::printf("removed key slot %s%s\n", a.slot.c_str(),
              a.slot == repo->opened_slot() ? " (the one that opened the repository this time)" : "");
  return kExitOk;
}

}  // namespace cbtfs
