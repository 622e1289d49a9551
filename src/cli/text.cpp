#include "text.hpp"

#include <cstdio>

namespace cbtfs {

namespace {

// Length of the well-formed UTF-8 sequence at s[i] (0: not one).
size_t utf8_length(const std::string& s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  size_t n = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  auto c1 = static_cast<unsigned char>(s[i + 1]);
  if (c == 0xE0 && c1 < 0xA0) return 0;  // overlong
  if (c == 0xED && c1 >= 0xA0) return 0;  // surrogates
  if (c == 0xF0 && c1 < 0x90) return 0;  // overlong
  if (c == 0xF4 && c1 >= 0x90) return 0;  // above U+10FFFF
  return n;
}

void escape(std::string& out, unsigned char c) {
  char buf[5];
  std::snprintf(buf, sizeof buf, "\\x%02x", c);
  out += buf;
}

}  // namespace

std::string printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == '\\') {
      out += "\\\\";
      ++i;
    } else if (c < 0x20 || c == 0x7F) {
      escape(out, c);
      ++i;
    } else if (c < 0x80) {
      out += s[i++];
    } else if (size_t n = utf8_length(s, i); n == 0 || (c == 0xC2 && static_cast<unsigned char>(s[i + 1]) < 0xA0)) {
      // Not UTF-8, or a C1 control (U+0080..U+009F: CSI is U+009B): escape byte by byte.
      size_t len = n ? n : 1;
      for (size_t k = 0; k < len; ++k) escape(out, static_cast<unsigned char>(s[i + k]));
      i += len;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
  return out;
}

}  // namespace cbtfs
