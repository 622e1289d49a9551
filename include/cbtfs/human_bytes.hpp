// Sizes for people: 1536 -> "1.5 KiB" (powers of 1024, one decimal).
// Used by the commands' progress lines and by the ingest's log lines.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace cbtfs {

inline std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", v, units[u]);
  return buf;
}

}  // namespace cbtfs
