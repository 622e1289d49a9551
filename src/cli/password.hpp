// Where a XAPI password comes from: a file or the environment, never argv.
#pragma once

#include <string>

namespace cbtfs {

// The first line of file, or $CBTFS_PASSWORD when file is empty; throws
// UsageError when there is neither. From then on the process makes no core
// dump (see keep_secrets_out_of_core_dumps).
std::string read_password(const std::string& file);

// Like ssh-agent: a process that holds a password or a key makes no core
// dump and cannot be ptrace-attached by other users, so the secret cannot
// leak through either. Copies of it sit in freed heap blocks and library
// buffers that no amount of wiping reaches.
void keep_secrets_out_of_core_dumps();

}  // namespace cbtfs
