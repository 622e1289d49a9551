// The ingest's parsers: XML-RPC as XAPI writes it, and the changed-block
// bitmap; the transfer's reorder window.
#include <catch2/catch.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <random>
#include <stdexcept>
#include <thread>

#include "ingest/changed_blocks.hpp"
#include "ingest/reorder_window.hpp"
#include "ingest/selection.hpp"
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

namespace {

using namespace std::chrono_literals;

// Runs fn on a thread of its own, detached, so that a test whose fn never
// returns fails on a timeout instead of hanging in a join (the window such
// a thread waits on is shared with it, not destroyed under it).
template <typename F>
auto on_thread(F fn) {
  std::packaged_task<decltype(fn())()> task(std::move(fn));
  auto result = task.get_future();
  std::thread(std::move(task)).detach();
  return result;
}

template <typename T>
bool returns_soon(const std::future<T>& f) {
  return f.wait_for(5s) == std::future_status::ready;
}

template <typename T>
bool still_blocked(const std::future<T>& f) {
  return f.wait_for(100ms) == std::future_status::timeout;
}

// Claims the next batch and gives each item a buffer holding its index.
ReorderWindow::Batch claim_filled(ReorderWindow& w, size_t max_items, size_t max_bytes) {
  ReorderWindow::Batch b;
  if (!w.claim(max_items, max_bytes, b)) return b;
  for (size_t k = 0; k < b.buffers.size(); ++k) {
    WindowBuffer& buf = b.buffers[k];
    if (buf.capacity < std::max(buf.size, sizeof(size_t))) {
      buf.capacity = std::max(buf.size, sizeof(size_t));
      buf.data.reset(new std::byte[buf.capacity]);
    }
    size_t item = b.first + k;
    std::memcpy(buf.data.get(), &item, sizeof item);
  }
  return b;
}

size_t item_of(const WindowBuffer& buf) {
  size_t item;
  std::memcpy(&item, buf.data.get(), sizeof item);
  return item;
}

}  // namespace

TEST_CASE("the reorder window gives items in order whatever order readers on several threads finish them") {
  constexpr size_t kItems = 2000, kMaxAhead = 64 << 10;
  std::vector<size_t> sizes(kItems);
  std::mt19937 rnd(7);
  for (auto& s : sizes) s = std::uniform_int_distribution<size_t>(8, 8 << 10)(rnd);
  sizes[100] = 100 << 10;  // larger than the bound: admitted alone
  ReorderWindow w(kItems, [&](size_t i) { return sizes[i]; }, kMaxAhead);
  std::atomic<size_t> claimed_end{0};  // a lower bound of the items claimed so far
  std::atomic<size_t> max_put{0}, put_out_of_order{0};

  std::vector<std::thread> readers;
  for (unsigned id = 0; id < 4; ++id)
    readers.emplace_back([&, id] {
      std::mt19937 r(id);
      for (;;) {
        auto b = claim_filled(w, 5, 20 << 10);
        if (b.buffers.empty()) return;
        size_t end = b.first + b.buffers.size();
        size_t seen = claimed_end.load();
        while (seen < end && !claimed_end.compare_exchange_weak(seen, end)) {
        }
        // items of a batch finished in a shuffled order, each after a while
        std::vector<size_t> order(b.buffers.size());
        for (size_t k = 0; k < order.size(); ++k) order[k] = k;
        std::shuffle(order.begin(), order.end(), r);
        for (size_t k : order) {
          if (r() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(r() % 200));
          w.put(b.first + k, std::move(b.buffers[k]));
          size_t item = b.first + k, before = max_put.load();
          while (before < item && !max_put.compare_exchange_weak(before, item)) {
          }
          put_out_of_order += item < before;
        }
      }
    });

  size_t out_of_order = 0, wrong_size = 0, over_bound = 0;
  for (size_t i = 0; i < kItems; ++i) {
    auto buf = w.take();
    REQUIRE(buf);
    out_of_order += item_of(*buf) != i;
    wrong_size += buf->size != sizes[i];
    // Claimed and not released: within the bound, or the single item
    // admitted when nothing else was outstanding.
    size_t end = claimed_end.load(), bytes = 0;
    for (size_t k = i; k < end; ++k) bytes += sizes[k];
    over_bound += bytes > kMaxAhead && end > i + 1;
    w.release(std::move(*buf));
  }
  CHECK_FALSE(w.take());  // past the last item
  for (auto& t : readers) t.join();
  CHECK(put_out_of_order > 0);  // else the test proves nothing
  CHECK(out_of_order == 0);
  CHECK(wrong_size == 0);
  CHECK(over_bound == 0);
}

TEST_CASE("a reader blocks while the bytes ahead of the writer exceed the bound, never on the next item") {
  // 40-byte items, a 100-byte bound; item 3 is larger than the bound
  std::vector<size_t> sizes = {40, 40, 40, 150, 40};
  auto wp = std::make_shared<ReorderWindow>(sizes.size(), [sizes](size_t i) { return sizes[i]; }, 100);
  ReorderWindow& w = *wp;
  auto b0 = claim_filled(w, 16, 1000);
  REQUIRE(b0.buffers.size() == 2);  // a third would make 120 bytes
  CHECK(b0.first == 0);

  auto second = on_thread([wp] { return claim_filled(*wp, 16, 1000); });
  CHECK(still_blocked(second));
  w.put(b0);
  auto item0 = w.take();
  REQUIRE(item0);
  CHECK(still_blocked(second));  // taken but not yet released: still ahead
  w.release(std::move(*item0));
  REQUIRE(returns_soon(second));
  auto b1 = second.get();
  CHECK(b1.first == 2);
  CHECK(b1.buffers.size() == 1);  // 40 + 40 ahead; item 3's 150 bytes wait

  // Item 3 is larger than the bound: admitted once nothing is outstanding.
  auto third = on_thread([wp] { return claim_filled(*wp, 16, 1000); });
  w.put(b1);
  for (int i = 0; i < 2; ++i) {
    CHECK(still_blocked(third));
    auto item = w.take();
    REQUIRE(item);
    w.release(std::move(*item));
  }
  REQUIRE(returns_soon(third));
  auto b3 = third.get();
  CHECK(b3.first == 3);
  CHECK(b3.buffers.size() == 1);
  w.put(b3);
  auto item3 = w.take();
  REQUIRE(item3);
  CHECK(item3->size == 150);
}

TEST_CASE("a batch stops at its byte and item limits, its first item whatever its size") {
  std::vector<size_t> sizes = {30, 30, 30, 30, 30, 30, 30, 90, 30};
  ReorderWindow w(sizes.size(), [&](size_t i) { return sizes[i]; }, 1000);
  ReorderWindow::Batch b;
  REQUIRE(w.claim(2, 1000, b));
  CHECK(b.first == 0);
  CHECK(b.buffers.size() == 2);
  REQUIRE(w.claim(16, 70, b));
  CHECK(b.first == 2);
  CHECK(b.buffers.size() == 2);
  REQUIRE(w.claim(16, 70, b));
  CHECK(b.buffers.size() == 2);
  REQUIRE(w.claim(16, 70, b));
  CHECK(b.first == 6);
  CHECK(b.buffers.size() == 1);  // 30 + 90 > 70
  REQUIRE(w.claim(16, 70, b));
  CHECK(b.first == 7);
  CHECK(b.buffers.size() == 1);  // 90 alone
  REQUIRE(w.claim(16, 70, b));
  CHECK(b.first == 8);
  CHECK_FALSE(w.claim(16, 70, b));  // all claimed
}

TEST_CASE("stopping the reorder window wakes blocked readers and the writer") {
  std::vector<size_t> sizes(10, 60);
  auto wp = std::make_shared<ReorderWindow>(sizes.size(), [sizes](size_t i) { return sizes[i]; }, 100);
  ReorderWindow& w = *wp;
  auto b = claim_filled(w, 16, 1000);
  REQUIRE(b.buffers.size() == 1);
  auto reader = on_thread([wp] {
    ReorderWindow::Batch more;
    return wp->claim(16, 1000, more);
  });
  auto writer = on_thread([wp] { return wp->take().has_value(); });
  CHECK(still_blocked(reader));
  CHECK(still_blocked(writer));
  CHECK_FALSE(w.stopped());
  w.stop();
  CHECK(w.stopped());
  REQUIRE(returns_soon(reader));
  CHECK_FALSE(reader.get());
  REQUIRE(returns_soon(writer));
  CHECK_FALSE(writer.get());
  ReorderWindow::Batch after;
  CHECK_FALSE(w.claim(16, 1000, after));
}

TEST_CASE("a failure wakes blocked readers and the writer, and the first one wins") {
  std::vector<size_t> sizes(10, 60);
  auto wp = std::make_shared<ReorderWindow>(sizes.size(), [sizes](size_t i) { return sizes[i]; }, 100);
  ReorderWindow& w = *wp;
  auto b = claim_filled(w, 16, 1000);
  REQUIRE(b.buffers.size() == 1);
  auto reader = on_thread([wp] {
    ReorderWindow::Batch more;
    return wp->claim(16, 1000, more);
  });
  auto writer = on_thread([wp] { return wp->take().has_value(); });
  CHECK(still_blocked(reader));
  CHECK(still_blocked(writer));
  w.fail(std::make_exception_ptr(std::runtime_error("first")));
  w.fail(std::make_exception_ptr(std::runtime_error("second")));
  REQUIRE(returns_soon(reader));
  CHECK_FALSE(reader.get());
  REQUIRE(returns_soon(writer));
  CHECK_THROWS_WITH(writer.get(), "first");
  // Even with its next item there, the writer gets the failure.
  w.put(b);
  CHECK_THROWS_WITH(w.take(), "first");
}

TEST_CASE("released buffers are handed out again when they fit") {
  std::vector<size_t> sizes = {100, 100, 200, 100};
  ReorderWindow w(sizes.size(), [&](size_t i) { return sizes[i]; }, 1000);
  auto b0 = claim_filled(w, 1, 1000);
  REQUIRE(b0.buffers.size() == 1);
  CHECK(b0.buffers[0].size == 100);
  const std::byte* first = b0.buffers[0].data.get();
  w.put(b0);
  auto item0 = w.take();
  REQUIRE(item0);
  w.release(std::move(*item0));

  ReorderWindow::Batch b;
  REQUIRE(w.claim(1, 1000, b));
  REQUIRE(b.buffers.size() == 1);
  CHECK(b.buffers[0].data.get() == first);  // reused
  CHECK(b.buffers[0].capacity == 100);
  w.put(b);
  auto item1 = w.take();
  REQUIRE(item1);
  w.release(std::move(*item1));

  REQUIRE(w.claim(1, 1000, b));
  REQUIRE(b.buffers.size() == 1);
  CHECK(b.buffers[0].size == 200);
  CHECK(b.buffers[0].data == nullptr);  // 100 bytes do not fit item 2
  CHECK(b.buffers[0].capacity == 0);
}

TEST_CASE("Selection: --all and --tag less the excluded; never templates, snapshots or control domains") {
  auto vm = [](std::string name, std::vector<std::string> tags) {
    PoolVm v;
    v.name = name;
    v.uuid = "uuid-" + name;
    v.tags = std::move(tags);
    return v;
  };
  std::vector<PoolVm> pool{vm("web", {"gold"}), vm("db", {"gold", "dev"}), vm("mail", {}), vm("tpl", {"gold"}),
                           vm("snap", {"gold"}), vm("dom0", {"gold"})};
  pool[3].is_template = true;
  pool[4].is_snapshot = true;
  pool[5].is_control_domain = true;
  auto names = [](const std::vector<PoolVm>& vms) {
    std::vector<std::string> out;
    for (auto& v : vms) out.push_back(v.name);
    return out;
  };
  VmFilter all;
  all.all = true;
  CHECK(names(select_vms(pool, all)) == std::vector<std::string>{"db", "mail", "web"});
  VmFilter gold;
  gold.tags = {"gold"};
  CHECK(names(select_vms(pool, gold)) == std::vector<std::string>{"db", "web"});
  gold.exclude_tags = {"dev"};
  CHECK(names(select_vms(pool, gold)) == std::vector<std::string>{"web"});
  all.exclude_vms = {"mail", "uuid-web"};
  CHECK(names(select_vms(pool, all)) == std::vector<std::string>{"db"});
  CHECK(VmFilter{}.empty());
}
