// Where a XAPI password comes from: a file or the environment, never argv.
#pragma once

#include <string>

#include "cbtfs/key_slots.hpp"  // keep_secrets_out_of_core_dumps

namespace cbtfs {

// The first line of file, or $CBTFS_PASSWORD when file is empty; throws
// UsageError when there is neither. From then on the process makes no core
// dump (see keep_secrets_out_of_core_dumps).
std::string read_password(const std::string& file);

}  // namespace cbtfs
