// Names that come from outside (VM and disk names set by a XenServer admin
// or a guest agent) on their way to a terminal.
#pragma once

#include <string>

namespace cbtfs {

// s with what a terminal would act on shown as escapes: control characters
// (C0, DEL, and C1 written as UTF-8) and bytes that are not UTF-8 become
// \xHH, a backslash becomes \\; printable UTF-8 stays as it is.
std::string printable(const std::string& s);

}  // namespace cbtfs
