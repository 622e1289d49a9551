// cbtfs-repo key list|add|remove: an encrypted repository's key slots.
// The repository is opened (so unlocked) first: only someone who can read
// it may add a way in, or take one away.
#include <cstdio>

#include "cbtfs/errors.hpp"
#include "cbtfs/exit_codes.hpp"
#include "cbtfs/key_slots.hpp"
#include "commands.hpp"

namespace cbtfs {

namespace {

std::shared_ptr<Repository> open_encrypted(const std::string& path) {
  auto repo = open_repository(path);
  if (!repo->sealer()) throw UsageError(path + " is not encrypted: it has no key slots");
  return repo;
}

}  // namespace

int cmd_key(const KeyArgs& a) {
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
    if (a.new_passphrase_file.empty() == a.new_key_file.empty())
      throw UsageError("key add: give the new slot's --new-passphrase-file FILE or --new-key-file FILE (one)");
    Unlocker u = a.new_key_file.empty() ? read_passphrase_file(a.new_passphrase_file) : read_key_file(a.new_key_file);
    std::string id = repo->add_key_slot(u);
    std::printf("added key slot %s (%s)\n", id.c_str(), a.new_key_file.empty() ? "passphrase" : "keyfile");
    return kExitOk;
  }
  repo->remove_key_slot(a.slot);
  std::printf("removed key slot %s%s\n", a.slot.c_str(),
              a.slot == repo->opened_slot() ? " (the one that opened the repository this time)" : "");
  return kExitOk;
}

}  // namespace cbtfs
