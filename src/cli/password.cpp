#include "password.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "cbtfs/errors.hpp"

namespace cbtfs {

std::string read_password(const std::string& file) {
  keep_secrets_out_of_core_dumps();
  std::string pw;
  if (!file.empty()) {
    std::ifstream in(file);
    if (!in) throw UsageError("cannot read the password file " + file);
    std::getline(in, pw);
  } else if (const char* env = std::getenv("CBTFS_PASSWORD")) {
    pw = env;
  } else {
    throw UsageError("no password: give --password-file FILE or set CBTFS_PASSWORD");
  }
  while (!pw.empty() && (pw.back() == '\r' || pw.back() == '\n')) pw.pop_back();
  return pw;
}

}  // namespace cbtfs
