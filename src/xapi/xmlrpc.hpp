// XML-RPC values and messages as XAPI writes them: strings, refs, enums and
// int64 often arrive as bare <value>text</value>, so every scalar keeps its
// text and converts on demand.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace cbtfs::xapi {

// A response that is not well-formed XML-RPC.
class ProtocolError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Value {
 public:
  enum class Type { Nil, Scalar, Bool, Array, Struct };

  Value() = default;
  Value(std::string s) : type_(Type::Scalar), text_(std::move(s)) {}
  Value(const char* s) : Value(std::string(s)) {}
  Value(int64_t v) : type_(Type::Scalar), text_(std::to_string(v)), is_int_(true) {}
  Value(bool b) : type_(Type::Bool), text_(b ? "1" : "0") {}
  Value(std::vector<Value> a) : type_(Type::Array), array_(std::move(a)) {}
  Value(std::map<std::string, Value> m) : type_(Type::Struct), struct_(std::move(m)) {}

  Type type() const { return type_; }
  bool is_int() const { return is_int_; }
  // Conversions throw ProtocolError naming what was expected.
  const std::string& str() const;
  int64_t to_int() const;
  bool to_bool() const;
  const std::vector<Value>& array() const;
  const std::map<std::string, Value>& fields() const;
  const Value& at(const std::string& key) const;
  bool has(const std::string& key) const { return type_ == Type::Struct && struct_.count(key); }

 private:
  Type type_ = Type::Nil;
  std::string text_;
  bool is_int_ = false;
  std::vector<Value> array_;
  std::map<std::string, Value> struct_;
};

std::string encode_call(const std::string& method, const std::vector<Value>& params);
// The one value of a methodResponse; a <fault> becomes a ProtocolError.
Value decode_response(std::string_view xml);

}  // namespace cbtfs::xapi
