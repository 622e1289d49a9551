// Where a XAPI password comes from: a file or the environment, never argv.
#pragma once

#include <string>

namespace cbtfs {

// The first line of file, or $CBTFS_PASSWORD when file is empty; throws
// UsageError when there is neither.
std::string read_password(const std::string& file);

}  // namespace cbtfs
