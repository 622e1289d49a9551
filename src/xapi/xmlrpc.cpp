// XML-RPC encoding and decoding with pugixml. The decoder accepts typed
// (<string>, <i4>, <int>, <i8>, <double>, <boolean>, <dateTime.iso8601>,
// <base64>) and untyped values, and never trusts the shape of its input.
#include "xmlrpc.hpp"

#include <pugixml.hpp>
#include <sstream>

namespace cbtfs::xapi {

const std::string& Value::str() const {
  if (type_ != Type::Scalar && type_ != Type::Nil) throw ProtocolError("expected a string in the XAPI response");
  return text_;
}

int64_t Value::to_int() const {
  if (type_ != Type::Scalar) throw ProtocolError("expected an integer in the XAPI response");
  try {
    size_t pos = 0;
    long long v = std::stoll(text_, &pos);
    if (pos != text_.size()) throw std::invalid_argument("trailing");
    return v;
  } catch (const std::exception&) {
    throw ProtocolError("expected an integer in the XAPI response, got '" + text_.substr(0, 40) + "'");
  }
}

bool Value::to_bool() const {
  if (type_ == Type::Bool || type_ == Type::Scalar) {
    if (text_ == "1" || text_ == "true") return true;
    if (text_ == "0" || text_ == "false") return false;
  }
  throw ProtocolError("expected a boolean in the XAPI response");
}

const std::vector<Value>& Value::array() const {
  if (type_ != Type::Array) throw ProtocolError("expected an array in the XAPI response");
  return array_;
}

const std::map<std::string, Value>& Value::fields() const {
  if (type_ != Type::Struct) throw ProtocolError("expected a struct in the XAPI response");
  return struct_;
}

const Value& Value::at(const std::string& key) const {
  auto& f = fields();
  auto it = f.find(key);
  if (it == f.end()) throw ProtocolError("field '" + key + "' missing in the XAPI response");
  return it->second;
}

namespace {

void encode_value(pugi::xml_node parent, const Value& v) {
  auto value = parent.append_child("value");
  switch (v.type()) {
    case Value::Type::Nil:
      break;
    case Value::Type::Scalar:
      value.append_child(v.is_int() ? "i8" : "string").text().set(v.str().c_str());
      break;
    case Value::Type::Bool:
      value.append_child("boolean").text().set(v.to_bool() ? "1" : "0");
      break;
    case Value::Type::Array: {
      auto data = value.append_child("array").append_child("data");
      for (auto& e : v.array()) encode_value(data, e);
      break;
    }
    case Value::Type::Struct: {
      auto st = value.append_child("struct");
      for (auto& [k, e] : v.fields()) {
        auto m = st.append_child("member");
        m.append_child("name").text().set(k.c_str());
        encode_value(m, e);
      }
      break;
    }
  }
}

Value decode_value(pugi::xml_node value, int depth) {
  if (depth > 64) throw ProtocolError("XAPI response nested too deeply");
  pugi::xml_node typed;
  for (auto c : value.children())
    if (c.type() == pugi::node_element) {
      typed = c;
      break;
    }
  if (!typed) return Value(std::string(value.text().get()));  // untyped: a string
  std::string_view tag = typed.name();
  if (tag == "string" || tag == "i4" || tag == "int" || tag == "i8" || tag == "double" || tag == "dateTime.iso8601" ||
      tag == "base64")
    return Value(std::string(typed.text().get()));
  if (tag == "boolean") {
    std::string t = typed.text().get();
    if (t != "0" && t != "1") throw ProtocolError("bad boolean in the XAPI response");
    return Value(t == "1");
  }
  if (tag == "nil") return Value();
  if (tag == "array") {
    std::vector<Value> out;
    for (auto v : typed.child("data").children("value")) out.push_back(decode_value(v, depth + 1));
    return Value(std::move(out));
  }
  if (tag == "struct") {
    std::map<std::string, Value> out;
    for (auto m : typed.children("member")) {
      auto name = m.child("name");
      auto v = m.child("value");
      if (!name || !v) throw ProtocolError("bad struct member in the XAPI response");
      out[name.text().get()] = decode_value(v, depth + 1);
    }
    return Value(std::move(out));
  }
  throw ProtocolError("unknown XML-RPC type <" + std::string(tag) + "> in the XAPI response");
}

}  // namespace

std::string encode_call(const std::string& method, const std::vector<Value>& params) {
  pugi::xml_document doc;
  auto decl = doc.append_child(pugi::node_declaration);
  decl.append_attribute("version") = "1.0";
  auto call = doc.append_child("methodCall");
  call.append_child("methodName").text().set(method.c_str());
  auto ps = call.append_child("params");
  for (auto& p : params) encode_value(ps.append_child("param"), p);
  std::ostringstream out;
  doc.save(out, "", pugi::format_raw);
  return out.str();
}

Value decode_response(std::string_view xml) {
  pugi::xml_document doc;
  auto r = doc.load_buffer(xml.data(), xml.size());
  if (!r) throw ProtocolError(std::string("XAPI response is not XML: ") + r.description());
  auto resp = doc.child("methodResponse");
  if (!resp) throw ProtocolError("XAPI response has no methodResponse");
  if (auto fault = resp.child("fault")) {
    auto v = decode_value(fault.child("value"), 0);
    std::string msg = v.has("faultString") ? v.at("faultString").str() : "unknown fault";
    throw ProtocolError("XML-RPC fault: " + msg);
  }
  auto value = resp.child("params").child("param").child("value");
  if (!value) throw ProtocolError("XAPI response has no value");
  return decode_value(value, 0);
}

}  // namespace cbtfs::xapi
