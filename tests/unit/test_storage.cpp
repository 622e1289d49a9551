// Storage backends without a server: the S3 settings' sources and their
// precedence, the chunk cache in front of a local directory, and the local
// directory's buffered writes.
#include <catch2/catch.hpp>

#include <sys/resource.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "cbtfs/cached_storage.hpp"
#include "cbtfs/errors.hpp"
#include "cbtfs/open_storage.hpp"
#include "cbtfs/s3_storage.hpp"

using namespace cbtfs;
namespace fs = std::filesystem;

namespace {
struct Env {
  explicit Env(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const char* n : {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION",
                          "AWS_ENDPOINT_URL", "CBTFS_S3_ENDPOINT", "CBTFS_S3_CONFIG", "CBTFS_S3_CA_FILE"})
      unsetenv(n);
    for (auto& [n, v] : vars) setenv(n, v, 1);
  }
};

fs::path temp_dir() {
  auto d = fs::temp_directory_path() / ("cbtfs-unit-" + std::to_string(std::random_device()()));
  fs::create_directories(d);
  return d;
}
}  // namespace

TEST_CASE("S3 settings: URL, environment, file, precedence") {
  Env env({{"AWS_ACCESS_KEY_ID", "AK"}, {"AWS_SECRET_ACCESS_KEY", "SK"}, {"AWS_REGION", "eu-1"}});
  S3Config c = s3_config_from_url("s3://bucket/a/b/");
  CHECK(c.bucket == "bucket");
  CHECK(c.prefix == "a/b");
  CHECK(c.region == "eu-1");
  CHECK(c.endpoint == "https://s3.eu-1.amazonaws.com");
  CHECK(c.access_key == "AK");

  c = s3_config_from_url("s3://bucket?endpoint=http://127.0.0.1:7480/&region=default");
  CHECK(c.prefix.empty());
  CHECK(c.endpoint == "http://127.0.0.1:7480");
  CHECK(c.region == "default");

  CHECK_THROWS_AS(s3_config_from_url("s3:///x"), UsageError);
  CHECK_THROWS_AS(s3_config_from_url("s3://b/x?secret_key=1"), UsageError);
  CHECK_THROWS_AS(s3_config_from_url("s3://b/x?colour=red"), UsageError);
}

TEST_CASE("S3 settings: a file below the environment, and no credentials is an error") {
  auto dir = temp_dir();
  std::ofstream(dir / "s3.conf") << "# comment\n\nendpoint = https://file.example\n"
                                    "access_key = FILEAK\nsecret_key = FILESK\nregion = r1\n";
  {
    Env env({{"CBTFS_S3_CONFIG", (dir / "s3.conf").c_str()}, {"CBTFS_S3_ENDPOINT", "https://env.example"}});
    S3Config c = s3_config_from_url("s3://b");
    CHECK(c.endpoint == "https://env.example");
    CHECK(c.access_key == "FILEAK");
    CHECK(c.secret_key == "FILESK");
    CHECK(c.region == "r1");
  }
  {
    std::ofstream(dir / "bad.conf") << "endpoint https://x\n";
    Env env({{"CBTFS_S3_CONFIG", (dir / "bad.conf").c_str()}});
    CHECK_THROWS_AS(s3_config_from_url("s3://b"), UsageError);
  }
  {
    Env env({});
    CHECK_THROWS_WITH(s3_config_from_url("s3://b"), Catch::Contains("no S3 credentials"));
  }
  fs::remove_all(dir);
}

TEST_CASE("chunk cache: reads equal the object's bytes, across chunks and evictions") {
  auto dir = temp_dir();
  fs::create_directories(dir / "repo");
  std::mt19937_64 rng(5);
  Bytes data(3 * 4096 + 123);
  for (auto& b : data) b = std::byte(rng());
  {
    auto st = open_local_storage((dir / "repo").string());
    st->put("obj", data);
  }
  CacheOptions o;
  o.dir = dir.string();
  o.chunk = 4096;
  o.size = 2 * 4096;  // fewer slots than chunks: evictions happen
  o.threads = 1;
  auto cache = make_cached_storage(open_local_storage((dir / "repo").string()), o);
  for (int i = 0; i < 500; ++i) {
    uint64_t off = rng() % data.size();
    uint64_t len = 1 + rng() % std::min<uint64_t>(9000, data.size() - off);
    Bytes out(len);
    cache->read("obj", off, out);
    REQUIRE(std::equal(out.begin(), out.end(), data.begin() + static_cast<long>(off)));
  }
  Bytes past(10);
  CHECK_THROWS_AS(cache->read("obj", data.size() - 5, past), FormatError);
  CHECK_THROWS_AS(cache->read("missing", 0, past), StorageError);
  fs::remove_all(dir);
}

TEST_CASE("local objects larger than the write buffers read back exactly") {
  auto dir = temp_dir();
  auto st = open_local_storage(dir.string());
  std::mt19937_64 rng(11);
  // Pieces of odd sizes straddle the 4 MiB buffers; the tail is unaligned.
  Bytes data(3 * (4 << 20) + 777777);
  for (auto& b : data) b = std::byte(rng());
  auto w = st->create("packs/big");
  for (size_t at = 0; at < data.size();) {
    size_t n = std::min<size_t>(data.size() - at, 1 + rng() % 200000);
    if (rng() % 2)
      w->append(std::span<const std::byte>(data).subspan(at, n));
    else
      w->append(Bytes(data.begin() + static_cast<long>(at), data.begin() + static_cast<long>(at + n)));
    at += n;
    REQUIRE(w->size() == at);
  }
  CHECK_FALSE(st->size("packs/big"));  // nothing visible before the commit
  w->commit();
  REQUIRE(st->size("packs/big") == data.size());
  CHECK(*st->get("packs/big") == data);
  // An object dropped unfinished (its buffers still being written) leaves nothing.
  {
    auto dropped = st->create("packs/dropped");
    dropped->append(std::span<const std::byte>(data));
  }
  CHECK(st->list("packs") == std::vector<std::string>{"big"});
  st->remove_temporaries("packs");
  CHECK(std::distance(fs::directory_iterator(dir / "packs"), fs::directory_iterator()) == 1);
  fs::remove_all(dir);
}

TEST_CASE("a write that fails in the background fails the object's commit") {
  auto dir = temp_dir();
  auto st = open_local_storage(dir.string());
  Bytes data(3 * (4 << 20), std::byte{1});
  // A real write error on demand: a file size limit makes the kernel refuse
  // writes past it with EFBIG.
  struct rlimit old {};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit low = old;
  low.rlim_cur = 6 << 20;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &low) == 0);
  bool threw = false;
  try {
    auto w = st->create("packs/too-big");
    w->append(std::span<const std::byte>(data));
    w->commit();
  } catch (const StorageError& e) {
    threw = true;
    CHECK_THAT(e.what(), Catch::Contains("cannot write") && Catch::Contains("too-big"));
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  CHECK(threw);
  CHECK_FALSE(st->size("packs/too-big"));
  CHECK(std::distance(fs::directory_iterator(dir / "packs"), fs::directory_iterator()) == 0);
  fs::remove_all(dir);
}
