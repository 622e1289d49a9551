// The ingest's parsers: XML-RPC as XAPI writes it, and the changed-block bitmap.
#include <catch2/catch.hpp>
#include <random>

#include "ingest/changed_blocks.hpp"
#include "xapi/client.hpp"
#include "xapi/xmlrpc.hpp"

using namespace cbtfs;
using namespace cbtfs::xapi;
using namespace cbtfs::ingest;

TEST_CASE("XAPI's untyped values: strings, refs and int64 as bare text") {
  Value v = decode_response(R"(<?xml version="1.0"?><methodResponse><params><param><value><struct>
    <member><name>Status</name><value>Success</value></member>
    <member><name>Value</name><value><struct>
      <member><name>uuid</name><value>3f1c0e9a-7c2d-4d51-9b8e-0c6a2f1d4e77</value></member>
      <member><name>virtual_size</name><value>10737418240</value></member>
      <member><name>port</name><value><i4>10809</i4></value></member>
      <member><name>cbt_enabled</name><value><boolean>1</boolean></value></member>
      <member><name>VBDs</name><value><array><data><value>OpaqueRef:a</value><value><string>OpaqueRef:b</string></value></data></array></value></member>
      <member><name>empty</name><value></value></member>
      <member><name>time</name><value><dateTime.iso8601>20261124T03:00:00Z</dateTime.iso8601></value></member>
    </struct></value></member></struct></value></param></params></methodResponse>)");
  CHECK(v.at("Status").str() == "Success");
  const Value& r = v.at("Value");
  CHECK(r.at("virtual_size").to_int() == 10737418240);
  CHECK(r.at("port").to_int() == 10809);
  CHECK(r.at("cbt_enabled").to_bool());
  CHECK(r.at("VBDs").array().size() == 2);
  CHECK(r.at("VBDs").array()[1].str() == "OpaqueRef:b");
  CHECK(r.at("empty").str().empty());
  CHECK(r.at("time").str() == "20261124T03:00:00Z");
  CHECK_THROWS_AS(r.at("missing"), ProtocolError);
  CHECK_THROWS_AS(r.at("uuid").to_int(), ProtocolError);
  CHECK_THROWS_AS(r.at("VBDs").str(), ProtocolError);
}

TEST_CASE("calls encode as XML-RPC that round-trips") {
  std::string xml = encode_call("VDI.list_changed_blocks", {Value("OpaqueRef:s"), Value(int64_t{42}), Value(true),
                                                          Value(std::map<std::string, Value>{{"k", Value("<&>")}})});
  CHECK(xml.find("<methodName>VDI.list_changed_blocks</methodName>") != std::string::npos);
  CHECK(xml.find("&lt;&amp;&gt;") != std::string::npos);
  CHECK(xml.find("<i8>42</i8>") != std::string::npos);
}

TEST_CASE("malformed responses are ProtocolErrors, never crashes") {
  for (const char* bad : {"", "<", "not xml", "<methodResponse/>", "<methodResponse><params/></methodResponse>",
                          "<methodResponse><fault><value><struct><member><name>faultString</name><value>boom</value>"
                          "</member></struct></value></fault></methodResponse>",
                          "<methodResponse><params><param><value><boolean>7</boolean></value></param></params></methodResponse>",
                          "<methodResponse><params><param><value><weird/></value></param></params></methodResponse>"})
    CHECK_THROWS_AS(decode_response(bad), ProtocolError);
  std::string deep = "<methodResponse><params><param>";
  for (int i = 0; i < 200; ++i) deep += "<value><array><data>";
  CHECK_THROWS_AS(decode_response(deep), ProtocolError);
}

TEST_CASE("XAPI errors carry their code and say what to do") {
  XapiError e("session.login_with_password", {"SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"});
  CHECK(e.code() == "SESSION_AUTHENTICATION_FAILED");
  CHECK(std::string(e.what()).find("wrong user name or password") != std::string::npos);
  XapiError f("VDI.list_changed_blocks", {"SR_BACKEND_FAILURE_460", "", "Source and target VDI are unrelated", ""});
  CHECK(f.param(1) == "Source and target VDI are unrelated");
  CHECK(std::string(f.what()).find("storage backend") != std::string::npos);
}

TEST_CASE("the changed-block bitmap is most significant bit first") {
  // "gAFA" = 80 01 40: block 0 (MSB of byte 0), 15 (LSB of byte 1), 17.
  auto bits = decode_changed_blocks("gAFA", 20);
  REQUIRE(bits.size() == 20);
  for (uint64_t b = 0; b < 20; ++b) CHECK(bits[b] == (b == 0 || b == 15 || b == 17));
  auto ext = changed_extents(bits, 32);
  REQUIRE(ext.size() == 3);
  CHECK(ext[1].first == 15);
  CHECK(ext[1].count == 1);
  // Padding and whitespace.
  CHECK(decode_changed_blocks("gA==", 8)[0]);
  CHECK(decode_changed_blocks("gA\n==", 1)[0]);
  CHECK(decode_changed_blocks("", 0).empty());
}

TEST_CASE("bad bitmaps are refused clearly") {
  CHECK_THROWS_AS(decode_changed_blocks("gA=", 8), BitmapError);
  CHECK_THROWS_AS(decode_changed_blocks("gAFA", 25), BitmapError);  // 3 bytes for 25 blocks
  CHECK_THROWS_AS(decode_changed_blocks("!!!!", 1), BitmapError);
  CHECK_THROWS_AS(decode_changed_blocks("/===", 1), BitmapError);  // found by fuzzing
  CHECK_THROWS_AS(decode_changed_blocks("gA=A", 1), BitmapError);
  std::mt19937 rng(1);
  for (int i = 0; i < 2000; ++i) {
    std::string s(rng() % 12, ' ');
    for (auto& c : s) c = static_cast<char>(rng());
    try {
      decode_changed_blocks(s, rng() % 64);
    } catch (const BitmapError&) {
    }
  }
}

TEST_CASE("extents are split at the request size") {
  std::vector<bool> bits(100, true);
  auto ext = changed_extents(bits, 32);
  REQUIRE(ext.size() == 4);
  CHECK(ext[3].first == 96);
  CHECK(ext[3].count == 4);
  auto all = all_extents(65, 32);
  REQUIRE(all.size() == 3);
  CHECK(all[2].count == 1);
}
