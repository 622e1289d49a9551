// The recovery key of an encrypted repository: its secret (data key and id
// key) written out for a person to keep on paper or in a password manager,
// and typed back when every key slot is lost or forgotten. Bound to the
// repository's id, with check digits on every line so that a typo is found
// on the line it is on, not as a key that opens nothing.
#pragma once

#include <string>

#include "cbtfs/key_slots.hpp"

namespace cbtfs {

// paper: numbered lines of 16 hex digits with their check digits, and a
// check of the whole; else one line (for a password manager).
std::string format_recovery_key(const RepoSecret& secret, const std::string& repo_id, bool paper);
// Either form back; spaces, case and blank lines do not matter. Throws
// UsageError naming the line that has a typo, and KeyError when the key is
// whole but not this repository's.
RepoSecret parse_recovery_key(const std::string& text, const std::string& repo_id);

}  // namespace cbtfs
