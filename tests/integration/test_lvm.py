"""LVM2 logical volumes as files of the mount, from a guest disk built with
the real lvm2 tools: a GPT disk with an ext4 /boot partition and two PV
partitions, a VG "debian-vg" with an LV extended after another LV was
created (three segments over both PVs), a striped LV with XFS, and a thin
pool and volume (reported, not shown).

The lvm2 commands never touch the host's LVM: they run with a throwaway
LVM_SYSTEM_DIR whose filter accepts only the test's loop devices, with
--driverloaded n (no device-mapper: nothing is ever activated, so nothing
can be left behind in device-mapper), no udev, no backups, and the VG is
created with autoactivation off. The loop devices are detached in a finally.

Without activation the LVs' contents are not written through device-mapper:
each file system is made in a file of the LV's size, then its bytes are laid
onto the disk where lvm2's own report (seg_pe_ranges, pe_start, stripes,
stripe_size) says the LV's extents are. That is the reference each LV file
of the mount must equal byte for byte."""

import json
import os
import random
import shutil
import subprocess
import tempfile

import pytest

from conftest import Mount, files_equal, import_image, repo_tool, root_only_file, run

VDI = "3c1d6a52-7b0e-4f19-9d8a-5e2f4b6c7d80"
CLONE = "9e8d7c6b-5a49-4382-a1b0-c9d8e7f6a5b4"
TIMES = ["2026-12-01T03:00:00Z", "2026-12-02T03:00:00Z"]
POINTS = ["2026-12-01T030000Z", "2026-12-02T030000Z"]
MIB = 1 << 20
EXTENT = MIB  # vgcreate -s 1M
VG = "debian-vg"
SHOWN = ["root", "home", "data"]


def lv_file(point, lv):
    return f"{point}-lv-{VG.replace('-', '--')}-{lv}.raw"


def rand_uuid(rnd):
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "-".join("".join(rnd.choice(chars) for _ in range(n)) for n in (6, 4, 4, 4, 4, 4, 6))


class Lvm:
    """lvm2 confined to the given devices."""

    def __init__(self, confdir, devices):
        os.makedirs(confdir, exist_ok=True)
        accept = ", ".join(f'"a|^{d}$|"' for d in devices)
        with open(os.path.join(confdir, "lvm.conf"), "w") as f:
            f.write(f"""devices {{
  filter = [ {accept}, "r|.*|" ]
  global_filter = [ {accept}, "r|.*|" ]
  use_devicesfile = 0
  obtain_device_list_from_udev = 0
}}
global {{ use_lvmlockd = 0 }}
activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }}
backup {{ backup = 0 archive = 0 }}
""")
        self.env = dict(os.environ, LVM_SYSTEM_DIR=confdir, LVM_SUPPRESS_FD_WARNINGS="1")

    def __call__(self, cmd, *args):
        return run(cmd, "--driverloaded", "n", *args, env=self.env)

    def report(self, cmd, *args):
        out = self(cmd, "--reportformat", "json", "--units", "b", "--nosuffix", *args).stdout
        return json.loads(out)["report"][0]


def partitions(disk):
    table = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]
    return [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]


def mkfs_ext4(path, size, files):
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", path)
    edit_fs(path, files)


def edit_fs(path, files, remove=()):
    d = tempfile.mkdtemp(prefix="cbtfs-lvfs-")
    run("mount", "-o", "loop", path, d)
    try:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        for name in remove:
            os.unlink(os.path.join(d, name))
    finally:
        run("umount", d)
        os.rmdir(d)


class Layout:
    """Where lvm2 says each LV's extents are: (disk offset, stripes, stripe size) per segment."""

    def __init__(self, lvm, loops, parts):
        part_of = {loop: off for loop, (off, _) in zip(loops, parts)}
        pe_start = {p["pv_name"]: int(p["pe_start"]) for p in lvm.report("pvs", "-o", "pv_name,pe_start")["pv"]}
        self.segments = {}
        rows = lvm.report("lvs", "-a", "--segments", "-o",
                          "lv_name,lv_uuid,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges,segtype", VG)["seg"]
        self.uuid = {}
        for r in rows:
            self.uuid[r["lv_name"]] = r["lv_uuid"]
            areas = []
            for rng in r["seg_pe_ranges"].split():
                dev, pes = rng.rsplit(":", 1)
                if dev not in part_of:  # on another LV (a thin pool's data)
                    continue
                first = int(pes.split("-")[0])
                areas.append(part_of[dev] + pe_start[dev] + first * EXTENT)
            self.segments.setdefault(r["lv_name"], []).append(
                (int(r["seg_start_pe"]), int(r["seg_size_pe"]), areas, int(r["stripe_size"] or 0), r["segtype"]))

    def lay(self, disk, lv, ref, skip_zeros=False):
        """Writes the LV's bytes (the file ref) where its extents are on disk."""
        with open(ref, "rb") as src, open(disk, "r+b") as dst:
            for start, count, areas, stripe_size, _ in self.segments[lv]:
                src.seek(start * EXTENT)
                length = count * EXTENT
                if len(areas) == 1:
                    pieces = [(areas[0], length)]
                else:  # dm-stripe: chunk i on stripe i % n, at (i // n) * chunk
                    n, chunk = len(areas), stripe_size
                    pieces = [(areas[i % n] + (i // n) * chunk, chunk) for i in range(length // chunk)]
                for at, size in pieces:
                    data = src.read(size)
                    if skip_zeros and data.count(0) == len(data):
                        continue
                    dst.seek(at)
                    dst.write(data)


def add_thin(lvm, tmp, rnd):
    """A thin pool and a thin volume. They cannot be created without
    device-mapper, so two plain LVs are made and lvm2 restores metadata in
    which they are the pool's hidden data and metadata LVs."""
    lvm("lvcreate", "-an", "-Zn", "-y", "-n", "tm", "-L", "2M", VG)
    lvm("lvcreate", "-an", "-Zn", "-y", "-n", "td", "-L", "2M", VG)
    backup = os.path.join(tmp, "vg.txt")
    lvm("vgcfgbackup", "-f", backup, VG)
    text = open(backup).read()
    for old, new in (("tm", "pool_tmeta"), ("td", "pool_tdata")):  # renamed and hidden
        head = f"\t\t{old} {{\n"
        i = text.index(head)
        j = text.index(', "VISIBLE"', i)
        text = text[:i] + f"\t\t{new} {{\n" + text[i + len(head):j] + text[j + len(', "VISIBLE"'):]
    sections = f"""
		pool {{
			id = "{rand_uuid(rnd)}"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 1

			segment1 {{
				start_extent = 0
				extent_count = 2
				type = "thin-pool"
				metadata = "pool_tmeta"
				pool = "pool_tdata"
				transaction_id = 1
				chunk_size = 128
				discards = "passdown"
				zero_new_blocks = 1
			}}
		}}

		thin {{
			id = "{rand_uuid(rnd)}"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 1

			segment1 {{
				start_extent = 0
				extent_count = 8
				type = "thin"
				thin_pool = "pool"
				transaction_id = 0
				device_id = 1
			}}
		}}
"""
    end = text.rindex("\t}\n\n}")
    text = text[:end] + sections + text[end:]
    with open(backup, "w") as f:
        f.write(text)
    lvm("vgcfgrestore", "--force", "-f", backup, VG)
    names = {r["lv_name"] for r in lvm.report("lvs", "-a", "-o", "lv_name", VG)["lv"]}
    assert {"pool", "thin", "[pool_tmeta]", "[pool_tdata]"} <= names, names


def no_leftovers(disk):
    assert run("losetup", "-j", disk).stdout.strip() == "", "a loop device is left on the test disk"
    if os.path.exists("/proc/misc") and "device-mapper" in open("/proc/misc").read():
        out = run("dmsetup", "ls", check=False).stdout
        assert VG.replace("-", "--") not in out, out


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """Two states of the guest disk and the reference bytes of each LV."""
    tmp = str(tmp_path_factory.mktemp("lvm"))
    rnd = random.Random(7)
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(420 * MIB)
    run("sgdisk", "-n", "1:2048:+8M", "-t", "1:8300", "-n", "2:0:+200M", "-t", "2:8e00",
        "-n", "3:0:+200M", "-t", "3:8e00", disk)
    parts = partitions(disk)
    boot_off, boot_size = parts[0]
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={boot_off}", disk, f"{boot_size // 1024}k")
    loops = []
    try:
        # Partitions 2 and 3 as loop devices of their own (no partition
        # scanning needed): a PV's bytes are relative to its device anyway.
        for off, size in parts[1:]:
            loops.append(run("losetup", "-f", "--show", "-o", off, "--sizelimit", size, disk).stdout.strip())
        lvm = Lvm(os.path.join(tmp, "lvm-etc"), loops)
        p2, p3 = loops
        lvm("pvcreate", "-y", p2, p3)
        lvm("vgcreate", "-y", "-s", "1M", "--setautoactivation", "n", VG, p2, p3)
        lvm("lvcreate", "-an", "-Zn", "-y", "-n", "root", "-L", "6M", VG, p2)
        lvm("lvcreate", "-an", "-Zn", "-y", "-n", "home", "-L", "3M", VG, p2)
        lvm("lvextend", "-L", "+5M", f"{VG}/root", p2)  # a second segment, after home
        lvm("lvcreate", "-an", "-Zn", "-y", "-i", "2", "-I", "64k", "-n", "data", "-L", "320M", VG)
        lvm("lvextend", "-L", "+4M", f"{VG}/root", p3)  # a third, on the other PV
        add_thin(lvm, tmp, rnd)
        layout = Layout(lvm, loops, parts[1:])
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
    no_leftovers(disk)
    assert len(layout.segments["root"]) == 3, layout.segments["root"]
    assert len(layout.segments["data"][0][2]) == 2  # striped over both PVs

    refs = {lv: os.path.join(tmp, f"{lv}-1.img") for lv in SHOWN}
    files = {f"file{i}.bin": rnd.randbytes(rnd.randint(1, 2 * MIB)) for i in range(4)}
    files["hello.txt"] = b"state one\n"
    mkfs_ext4(refs["root"], 15 * MIB, files)
    mkfs_ext4(refs["home"], 3 * MIB, {"user.txt": b"home of the user\n"})
    with open(refs["data"], "wb") as f:
        f.truncate(320 * MIB)
    run("mkfs.xfs", "-q", "-f", refs["data"])
    edit_fs(refs["data"], {"big.bin": rnd.randbytes(5 * MIB + 123), "x.txt": b"on xfs\n"})
    for lv in SHOWN:
        assert os.path.getsize(refs[lv]) == sum(c for _, c, *_ in layout.segments[lv]) * EXTENT
        layout.lay(disk, lv, refs[lv], skip_zeros=True)
    s1 = os.path.join(tmp, "s1.img")
    shutil.copyfile(disk, s1)
    # State 2: a file changed and one deleted in root.
    root2 = os.path.join(tmp, "root-2.img")
    shutil.copyfile(refs["root"], root2)
    edit_fs(root2, {"hello.txt": b"state two\n"}, remove=["file0.bin"])
    layout.lay(disk, "root", root2)
    s2 = os.path.join(tmp, "s2.img")
    shutil.copyfile(disk, s2)
    os.unlink(disk)

    repo = os.path.join(tmp, "repo")
    repo_tool("init", repo)
    import_image(repo, s1, VDI, TIMES[0], vm="lvm guest", name="disk")
    import_image(repo, s2, VDI, TIMES[1], vm="lvm guest", name="disk")
    import_image(repo, s1, CLONE, TIMES[0], vm="lvm guest clone", name="disk")  # same VG name and uuids
    return {"repo": repo, "refs": [refs, dict(refs, root=root2)], "layout": layout, "tmp": tmp}


def test_each_lv_is_a_file_of_exact_size_and_content(guest, mnt):
    with Mount(guest["repo"], mnt) as m:
        names = set(os.listdir(m.path(VDI)))
        for point, refs in zip(POINTS, guest["refs"]):
            for lv in SHOWN:
                f = m.path(VDI, lv_file(point, lv))
                assert lv_file(point, lv) in names
                assert os.path.getsize(f) == os.path.getsize(refs[lv]), lv
                assert files_equal(f, refs[lv]), f"{point} {lv}"
            for part in (1, 2, 3):
                assert f"{point}-part{part}.raw" in names
        for lv in SHOWN:
            assert os.readlink(m.path(VDI, f"latest-lv-debian--vg-{lv}.raw")) == lv_file(POINTS[1], lv)
        # The two points differ only in root.
        assert not files_equal(m.path(VDI, lv_file(POINTS[0], "root")), m.path(VDI, lv_file(POINTS[1], "root")))
        assert files_equal(m.path(VDI, lv_file(POINTS[0], "data")), m.path(VDI, lv_file(POINTS[1], "data")))


def test_lv_extended_after_another_reads_through_its_segments(guest, mnt):
    layout = guest["layout"]
    with Mount(guest["repo"], mnt) as m:
        f = m.path(VDI, lv_file(POINTS[0], "root"))
        assert os.getxattr(f, "user.cbtfs.lv.vg") == VG.encode()
        assert os.getxattr(f, "user.cbtfs.lv.lv") == b"root"
        assert os.getxattr(f, "user.cbtfs.lv.uuid").decode() == layout.uuid["root"]
        segs = os.getxattr(f, "user.cbtfs.lv.segments").decode().split()
        assert [s.split(":")[0] for s in segs] == ["0+6", "6+5", "11+4"]
        assert os.getxattr(f, "user.cbtfs.virtual_size") == str(15 * MIB).encode()
        # Read at each segment boundary, unaligned, against the reference.
        ref = open(guest["refs"][0]["root"], "rb").read()
        with open(f, "rb") as lvf:
            for at in (6 * MIB - 777, 11 * MIB - 1, 15 * MIB - 4096):
                lvf.seek(at)
                assert lvf.read(5000) == ref[at:at + 5000], at
        striped = m.path(VDI, lv_file(POINTS[0], "data"))
        assert os.getxattr(striped, "user.cbtfs.lv.segments").decode().endswith("/65536")


def test_lv_files_mount_with_their_files(guest, mnt):
    with Mount(guest["repo"], mnt) as m:
        for point, hello in zip(POINTS, [b"state one\n", b"state two\n"]):
            d = tempfile.mkdtemp(prefix="cbtfs-lvmnt-")
            run("mount", "-o", "loop,ro", m.path(VDI, lv_file(point, "root")), d)
            try:
                assert open(os.path.join(d, "hello.txt"), "rb").read() == hello
                assert os.path.exists(os.path.join(d, "file0.bin")) == (point == POINTS[0])
            finally:
                run("umount", d)
                os.rmdir(d)
        d = tempfile.mkdtemp(prefix="cbtfs-lvmnt-")
        run("mount", "-o", "loop,ro", m.path(VDI, lv_file(POINTS[1], "data")), d)
        try:
            assert open(os.path.join(d, "x.txt"), "rb").read() == b"on xfs\n"
            assert os.path.getsize(os.path.join(d, "big.bin")) == 5 * MIB + 123
        finally:
            run("umount", d)
            os.rmdir(d)


def test_sparse_lv_copies_sparse_and_seeks_to_its_data(guest, mnt, tmp_path):
    with Mount(guest["repo"], mnt) as m:
        f = m.path(VDI, lv_file(POINTS[0], "data"))
        ref = guest["refs"][0]["data"]
        # Only the blocks holding data count, over both stripes.
        assert 0 < os.stat(f).st_blocks * 512 < os.path.getsize(f) // 4
        copy = tmp_path / "data.img"
        run("cp", "--sparse=always", f, copy)
        assert files_equal(copy, ref)
        assert os.stat(copy).st_blocks * 512 < os.path.getsize(f) // 4
        fd = os.open(f, os.O_RDONLY)
        try:
            pos, seen = 0, 0
            while True:  # every byte outside the data ranges found is zero in the reference
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    data = os.path.getsize(f)
                with open(ref, "rb") as r:
                    r.seek(pos)
                    assert r.read(data - pos).count(0) == data - pos, (pos, data)
                if data >= os.path.getsize(f):
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                assert hole > data
                seen += hole - data
                pos = hole
            assert 0 < seen < os.path.getsize(f) // 4
        finally:
            os.close(fd)


def test_clone_with_the_same_vg_shows_at_once(guest, mnt):
    with Mount(guest["repo"], mnt) as m:
        for lv in SHOWN:
            a, b = m.path(VDI, lv_file(POINTS[0], lv)), m.path(CLONE, lv_file(POINTS[0], lv))
            assert files_equal(a, b), lv
            assert os.getxattr(a, "user.cbtfs.lv.uuid") == os.getxattr(b, "user.cbtfs.lv.uuid")
            assert os.getxattr(b, "user.cbtfs.vdi_uuid") == CLONE.encode()


def test_thin_volumes_are_reported_not_shown(guest, mnt):
    with Mount(guest["repo"], mnt) as m:
        names = os.listdir(m.path(VDI))
        assert not [n for n in names if "thin" in n or "pool" in n], names
        for point in POINTS:
            skipped = os.getxattr(m.path(VDI, f"{point}.raw"), "user.cbtfs.lvm.skipped").decode()
            assert "debian-vg/thin: thin volume (not supported)" in skipped, skipped
            assert "debian-vg/pool: thin pool (not supported)" in skipped, skipped
            assert "pool_t" not in skipped  # the pool's hidden parts are not volumes
            assert "user.cbtfs.lvm.skipped" in os.listxattr(m.path(VDI, f"{point}.raw"))
        # Neither on a partition nor on an LV.
        assert "user.cbtfs.lvm.skipped" not in os.listxattr(m.path(VDI, f"{POINTS[0]}-part2.raw"))
        assert "user.cbtfs.lvm.skipped" not in os.listxattr(m.path(VDI, lv_file(POINTS[0], "root")))


def test_browse_mounts_the_logical_volumes(guest, tmp_path):
    """cbtfs-browse shows each LV's file system, not the PVs they live on."""
    from test_browse import Browses, assert_clean, browse, parse_listing

    b = Browses(tmp_path)
    try:
        d = b.dir("view")
        p = browse(guest["repo"], VDI, POINTS[1], d)
        listing = parse_listing(p.stdout)
        assert listing["lv-debian--vg-root"][0] == "ext4", p.stdout
        assert listing["lv-debian--vg-home"][0] == "ext4", p.stdout
        assert listing["lv-debian--vg-data"][0] == "xfs", p.stdout
        assert listing["part1"][0] == "ext4", p.stdout
        assert "part2" not in os.listdir(d) and "part3" not in os.listdir(d)  # the PVs themselves
        with open(os.path.join(d, "lv-debian--vg-root", "hello.txt"), "rb") as f:
            assert f.read() == b"state two\n"
        assert not os.path.exists(os.path.join(d, "lv-debian--vg-root", "file0.bin"))
        with open(os.path.join(d, "lv-debian--vg-home", "user.txt"), "rb") as f:
            assert f.read() == b"home of the user\n"
        with open(os.path.join(d, "lv-debian--vg-data", "x.txt"), "rb") as f:
            assert f.read() == b"on xfs\n"
        # The clone, with the same VG name and file-system uuids, at the same time.
        d2 = b.dir("clone")
        browse(guest["repo"], CLONE, POINTS[0], d2)
        with open(os.path.join(d2, "lv-debian--vg-root", "hello.txt"), "rb") as f:
            assert f.read() == b"state one\n"
        browse("-u", d)
        browse("-u", d2)
        assert_clean(d)
        assert_clean(d2)
    finally:
        b.undo_all()


def test_an_encrypted_copy_browses_its_logical_volumes(guest, tmp_path, monkeypatch):
    """The guest's repository made encrypted by copying it (as an admin moves
    backups to a bucket of another site), then browsed from the copy with
    the passphrase in a root-only file: each LV as the guest had it."""
    from test_browse import Browses, assert_clean, browse, parse_listing

    secret = root_only_file(tmp_path / "passphrase", "lvm guest, encrypted copy\n")
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(secret))
    enc = str(tmp_path / "enc")
    repo_tool("init", "--encryption", "passphrase", enc)
    repo_tool("copy", guest["repo"], enc, VDI)
    assert "verify OK" in repo_tool("verify", enc).stdout
    b = Browses(tmp_path)
    try:
        d = b.dir("view")
        listing = parse_listing(browse(enc, VDI, POINTS[1], d).stdout)
        assert [listing[f"lv-debian--vg-{lv}"][0] for lv in SHOWN] == ["ext4", "ext4", "xfs"], listing
        with open(os.path.join(d, "lv-debian--vg-root", "hello.txt"), "rb") as f:
            assert f.read() == b"state two\n"
        assert not os.path.exists(os.path.join(d, "lv-debian--vg-root", "file0.bin"))
        with open(os.path.join(d, "lv-debian--vg-data", "x.txt"), "rb") as f:
            assert f.read() == b"on xfs\n"
        # each LV's bytes are those of the plain repository's LV file
        with Mount(enc, tmp_path / "mnt") as m:
            for lv in SHOWN:
                assert files_equal(m.path(VDI, lv_file(POINTS[1], lv)), guest["refs"][1][lv]), lv
        browse("-u", d)
        assert_clean(d)
    finally:
        b.undo_all()
