// Sizes given on command lines: "4096", "512K", "512M", "4G", "1T" (powers
// of 1024; a trailing "B" or "iB" is accepted: "4GiB").
#pragma once

#include <cctype>
#include <cstdint>
#include <optional>
#include <string>

namespace cbtfs {

// nullopt for anything else, and for sizes that do not fit in 64 bits.
inline std::optional<uint64_t> parse_size(const std::string& s) {
  size_t i = 0;
  uint64_t n = 0;
  for (; i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])); ++i) {
    uint64_t d = static_cast<uint64_t>(s[i] - '0');
    if (n > (UINT64_MAX - d) / 10) return std::nullopt;
    n = n * 10 + d;
  }
  if (i == 0) return std::nullopt;
  std::string unit = s.substr(i);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (unit.size() > 1 && (unit.substr(1) == "B" || unit.substr(1) == "IB")) unit.resize(1);
  static const std::string kUnits = "KMGTP";
  unsigned shift = 0;
  if (unit == "B" || unit.empty()) {
    shift = 0;
  } else if (unit.size() == 1 && kUnits.find(unit[0]) != std::string::npos) {
    shift = 10 * static_cast<unsigned>(kUnits.find(unit[0]) + 1);
  } else {
    return std::nullopt;
  }
  if (shift && n > (UINT64_MAX >> shift)) return std::nullopt;
  return n << shift;
}

}  // namespace cbtfs
