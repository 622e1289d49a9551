// The keys of an encrypted repository and the slots that hold them.
//
// init makes the repository's secret at random: the data key (every seal)
// and the id key (block ids). Neither is ever stored in the clear: each key
// slot holds the secret sealed with a key-encryption key derived from one
// passphrase (scrypt, memory-hard) or one key file. A slot is an object of
// its own, so adding or removing one writes or removes that object only:
// never the header, never the data.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "cbtfs/format.hpp"
#include "cbtfs/seal.hpp"

namespace cbtfs {

struct RepoSecret {
  DataKey data_key{};
  IdKey id_key{};
};
RepoSecret random_repo_secret();

// Something that may open a slot: a passphrase, or a key file's bytes.
struct Unlocker {
  enum class Kind { passphrase, keyfile };
  Kind kind;
  std::string secret;
  std::string source;  // where it came from, for messages (never the secret)
};

// One key slot: the object keys/<id>.slot, JSON. Its parameters need no
// checksum of their own: altered ones derive another key, which opens
// nothing.
struct KeySlot {
  std::string kind;  // "passphrase" (scrypt) or "keyfile"
  std::string salt;  // hex
  uint64_t n = 0;    // scrypt's cost parameters (passphrase slots)
  uint32_t r = 0, p = 0;
  std::string sealed;  // hex: the secret (data key, then id key), sealed with the derived key
};
Bytes encode_key_slot(const KeySlot& slot);
KeySlot decode_key_slot(std::span<const std::byte> data, const std::string& where);  // FormatError
std::string random_slot_id();  // 16 hex digits

// A new slot holding secret, opened by u. repo_id binds it to this repository.
KeySlot make_key_slot(const RepoSecret& secret, const Unlocker& u, const std::string& repo_id);
// The secret if u opens the slot (a slot of another kind is not tried).
std::optional<RepoSecret> open_key_slot(const KeySlot& slot, const Unlocker& u, const std::string& repo_id);

// Where the commands find what unlocks an encrypted repository, in this
// order; all that are set are tried. Never the command line: argv is
// world-readable in /proc.
//   $CBTFS_PASSPHRASE_FILE  a file whose first line is the passphrase
//   $CBTFS_KEY_FILE         a key file
//   $CREDENTIALS_DIRECTORY/cbtfs-passphrase, .../cbtfs-key  (systemd's LoadCredential=)
//   $CBTFS_PASSPHRASE       the passphrase itself
// Reading one makes the process undumpable first (no core dump holds it).
std::vector<Unlocker> unlockers_from_environment();
Unlocker read_passphrase_file(const std::string& path);
// Like ssh-agent: a process that holds a password or a key makes no core
// dump and cannot be ptrace-attached by other users, so the secret cannot
// leak through either. Copies of it sit in freed heap blocks and library
// buffers that no amount of wiping reaches.
void keep_secrets_out_of_core_dumps();
Unlocker read_key_file(const std::string& path);
// The key file when one is named, else the passphrase file.
Unlocker read_unlocker(const std::string& passphrase_file, const std::string& key_file);

}  // namespace cbtfs
