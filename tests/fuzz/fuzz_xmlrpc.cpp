// XAPI responses: any bytes give a Value or a ProtocolError; walking the
// Value with every accessor never crashes.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "xapi/xmlrpc.hpp"

using cbtfs::xapi::ProtocolError;
using cbtfs::xapi::Value;

static void walk(const Value& v, int depth) {
  if (depth > 100) return;
  try {
    (void)v.to_int();
  } catch (const ProtocolError&) {
  }
  try {
    (void)v.to_bool();
  } catch (const ProtocolError&) {
  }
  try {
    (void)v.str();
  } catch (const ProtocolError&) {
  }
  if (v.type() == Value::Type::Array)
    for (auto& e : v.array()) walk(e, depth + 1);
  if (v.type() == Value::Type::Struct)
    for (auto& [k, e] : v.fields()) walk(e, depth + 1);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    walk(cbtfs::xapi::decode_response({reinterpret_cast<const char*>(data), size}), 0);
  } catch (const ProtocolError&) {
  }
  return 0;
}
