// The recovery key's two forms. Paper:
//
//   cbtfs recovery key, repository <uuid>
//    1: 3f2a 9c01 77de 0a1b  c3d4      8 bytes of the secret, then 16 bits
//   ...                                of SHA-256 over the line's number and bytes
//    8: ...
//   check: 1a2b3c4d                    32 bits of SHA-256 over the repository id and the secret
//
// One line: "cbtfs-recovery-1:" 128 hex digits ":" the check.
#include "cbtfs/recovery_key.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <regex>
#include <sstream>
#include <vector>

#include "cbtfs/errors.hpp"

namespace cbtfs {

namespace {

constexpr size_t kSecretSize = 64, kLineBytes = 8, kLines = kSecretSize / kLineBytes;
constexpr const char* kOneLinePrefix = "cbtfs-recovery-1:";

std::array<unsigned char, 32> sha256(const std::string& data) {
  std::array<unsigned char, 32> d{};
  unsigned int n = 0;
  if (EVP_Digest(data.data(), data.size(), d.data(), &n, EVP_sha256(), nullptr) != 1) throw std::runtime_error("SHA-256 failed");
  return d;
}

std::string secret_bytes(const RepoSecret& s) {
  std::string b(kSecretSize, '\0');
  std::memcpy(b.data(), s.data_key.data(), 32);
  std::memcpy(b.data() + 32, s.id_key.data(), 32);
  return b;
}

std::string line_check(size_t line, const std::string& bytes) {
  auto d = sha256("cbtfs recovery line " + std::to_string(line) + ":" + bytes);
  return to_hex(d.data(), 2);
}

std::string whole_check(const std::string& repo_id, const std::string& bytes) {
  auto d = sha256("cbtfs recovery key " + repo_id + ":" + bytes);
  return to_hex(d.data(), 4);
}

std::string unhex(const std::string& h) {
  std::string b(h.size() / 2, '\0');
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>(std::stoi(h.substr(2 * i, 2), nullptr, 16));
  return b;
}

// Lower case, without spaces.
std::string squeeze(const std::string& s) {
  std::string out;
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool all_hex(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
}

RepoSecret to_secret(const std::string& bytes) {
  RepoSecret s;
  std::memcpy(s.data_key.data(), bytes.data(), 32);
  std::memcpy(s.id_key.data(), bytes.data() + 32, 32);
  return s;
}

}  // namespace

std::string format_recovery_key(const RepoSecret& secret, const std::string& repo_id, bool paper) {
  std::string b = secret_bytes(secret);
  auto* p = reinterpret_cast<const unsigned char*>(b.data());
  if (!paper) return kOneLinePrefix + to_hex(p, b.size()) + ":" + whole_check(repo_id, b) + "\n";
  std::ostringstream out;
  out << "cbtfs recovery key, repository " << repo_id << "\n";
  for (size_t l = 0; l < kLines; ++l) {
    std::string h = to_hex(p + l * kLineBytes, kLineBytes);
    out << (l + 1 < 10 ? " " : "") << l + 1 << ": " << h.substr(0, 4) << " " << h.substr(4, 4) << " " << h.substr(8, 4)
        << " " << h.substr(12, 4) << "  " << line_check(l + 1, b.substr(l * kLineBytes, kLineBytes)) << "\n";
  }
  out << "check: " << whole_check(repo_id, b) << "\n";
  return out.str();
}

RepoSecret parse_recovery_key(const std::string& text, const std::string& repo_id) {
  std::string bytes, check;
  std::istringstream in(text);
  std::string line;
  std::vector<std::string> lines(kLines);
  static const std::regex numbered(R"(^\s*(\d+)\s*[:.]\s*([0-9a-fA-F\s]+)$)");
  static const std::regex whole(R"(^\s*check\s*:\s*([0-9a-fA-F]{8})\s*$)", std::regex::icase);
  while (std::getline(in, line)) {
    std::smatch m;
    if (auto pos = squeeze(line).find(kOneLinePrefix); pos != std::string::npos) {
      std::string rest = squeeze(line).substr(pos + std::strlen(kOneLinePrefix));
      auto colon = rest.find(':');
      if (colon != 2 * kSecretSize || rest.size() != colon + 9 || !all_hex(rest.substr(0, colon)) ||
          !all_hex(rest.substr(colon + 1)))
        throw UsageError("the recovery key line is cut short or has a typo: it is " + std::string(kOneLinePrefix) +
                         " then 128 hexadecimal digits, ':' and 8 more");
      bytes = unhex(rest.substr(0, colon));
      check = rest.substr(colon + 1);
      break;
    }
    if (std::regex_match(line, m, whole)) {
      check = squeeze(m[1]);
    } else if (std::regex_match(line, m, numbered)) {
      size_t n = std::stoul(m[1]);
      std::string digits = squeeze(m[2]);
      if (n < 1 || n > kLines) throw UsageError("recovery key line " + std::to_string(n) + ": there are lines 1 to 8 only");
      if (digits.size() != 2 * kLineBytes + 4)
        throw UsageError("recovery key line " + std::to_string(n) + ": it has " + std::to_string(digits.size()) +
                         " hexadecimal digits, not 20 (a digit left out or typed twice)");
      std::string b = unhex(digits.substr(0, 2 * kLineBytes));
      if (line_check(n, b) != digits.substr(2 * kLineBytes))
        throw UsageError("recovery key line " + std::to_string(n) + ": a typo (its check digits differ)");
      lines[n - 1] = b;
    }
  }
  if (bytes.empty()) {
    for (size_t l = 0; l < kLines; ++l)
      if (lines[l].empty())
        throw UsageError("the recovery key has no line " + std::to_string(l + 1) +
                         " (give all eight numbered lines and the check line, or the one-line form)");
    for (auto& l : lines) bytes += l;
  }
  if (check.empty()) throw UsageError("the recovery key has no check line ('check: ' and 8 hexadecimal digits)");
  if (whole_check(repo_id, bytes) != check)
    throw KeyError("the recovery key is not this repository's (repository " + repo_id +
                   "), or its check line has a typo");
  return to_secret(bytes);
}

}  // namespace cbtfs
