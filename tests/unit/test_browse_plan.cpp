// cbtfs-browse's decisions, without mounting anything: which files of a
// point are file systems and under which names, what each type gets, and
// the state file that -u reads back.
#include <catch2/catch.hpp>

#include "cbtfs/errors.hpp"
#include "mount/browse_plan.hpp"

using namespace cbtfs;
using namespace cbtfs::browse;

namespace {
std::vector<std::string> names_of(const std::vector<Target>& ts) {
  std::vector<std::string> out;
  for (auto& t : ts) out.push_back(t.name + "=" + t.file);
  return out;
}
const std::string P = "2026-11-24T030000Z";
}  // namespace

TEST_CASE("partitions in number order, never the whole disk beside them") {
  std::vector<std::string> dir = {P + ".raw", P + "-part10.raw", P + "-part2.raw", P + "-part1.raw",
                                  "2026-11-25T030000Z-part3.raw", "latest.raw", "latest-part1.raw"};
  CHECK(names_of(targets_of(dir, P)) ==
        std::vector<std::string>{"part1=" + P + "-part1.raw", "part2=" + P + "-part2.raw",
                                 "part10=" + P + "-part10.raw"});
}

TEST_CASE("a disk without a table is browsed whole, as disk") {
  CHECK(names_of(targets_of({P + ".raw", "latest.raw"}, P)) == std::vector<std::string>{"disk=" + P + ".raw"});
  CHECK(targets_of({"latest.raw"}, P).empty());
}

TEST_CASE("logical volumes come after the partitions, or after the whole-disk PV") {
  std::vector<std::string> dir = {P + ".raw", P + "-lv-vg0-root.raw", P + "-part1.raw", P + "-lv-vg0-home.raw",
                                  P + "-lv-.raw", P + "-partx.raw", P + "-other.raw"};
  CHECK(names_of(targets_of(dir, P)) ==
        std::vector<std::string>{"part1=" + P + "-part1.raw", "lv-vg0-home=" + P + "-lv-vg0-home.raw",
                                 "lv-vg0-root=" + P + "-lv-vg0-root.raw"});
  CHECK(names_of(targets_of({P + ".raw", P + "-lv-vg-data.raw"}, P)) ==
        std::vector<std::string>{"disk=" + P + ".raw", "lv-vg-data=" + P + "-lv-vg-data.raw"});
}

TEST_CASE("what each file system type gets") {
  auto x = classify("xfs");
  CHECK(x.kind == FsAction::Kind::Mount);
  CHECK(x.options == "ro,nosuid,nodev,nouuid");
  CHECK(classify("ext4").options == "ro,nosuid,nodev");
  CHECK(classify("ext3").type == "ext3");
  CHECK(classify("btrfs").kind == FsAction::Kind::Mount);
  CHECK(classify("vfat").kind == FsAction::Kind::Mount);
  CHECK(classify("ntfs").kind == FsAction::Kind::Ntfs3g);
  for (auto [t, word] : std::vector<std::pair<std::string, std::string>>{
           {"crypto_LUKS", "LUKS"}, {"BitLocker", "BitLocker"}, {"zfs_member", "ZFS"}, {"refs", "ReFS"},
           {"LVM2_member", "logical volumes"}, {"swap", "swap"}, {"", "no file system"},
           {"linux_raid_member", "RAID"}, {"hfsplus", "hfsplus"}}) {
    auto a = classify(t);
    CHECK(a.kind == FsAction::Kind::Skip);
    CHECK(a.why.find(word) != std::string::npos);
  }
}

TEST_CASE("blkid's export output") {
  auto m = parse_blkid_export("DEVNAME=/x\nUUID=1234\nTYPE=ext4\nLABEL=a=b\n\nnonsense\n");
  CHECK(m["TYPE"] == "ext4");
  CHECK(m["LABEL"] == "a=b");
  CHECK(m.count("nonsense") == 0);
}

TEST_CASE("the state file round-trips paths with blanks, and refuses newlines") {
  std::string text = state_line("dir", "/mnt/my view") + state_line("tmpfs", "/mnt/my view") + state_line("x", "");
  auto s = parse_state(text);
  REQUIRE(s.size() == 3);
  CHECK(state_value(s, "dir") == "/mnt/my view");
  CHECK(state_value(s, "tmpfs") == "/mnt/my view");
  CHECK(state_value(s, "missing").empty());
  CHECK_THROWS_AS(state_line("dir", "/a\nb"), UsageError);
}

TEST_CASE("the private directory is named after DIR, the same every time") {
  auto a = private_dir("/run/cbtfs-browse", "/mnt/a"), b = private_dir("/run/cbtfs-browse", "/mnt/b");
  CHECK(a == private_dir("/run/cbtfs-browse", "/mnt/a"));
  CHECK(a != b);
  CHECK(a.size() == std::string("/run/cbtfs-browse/").size() + 16);
}
