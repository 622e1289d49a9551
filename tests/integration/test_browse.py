"""cbtfs-browse: the files of a point as the guest had them at the snapshot.

The guest disks are made with the real tools (sgdisk, sfdisk, mkfs.ext4,
mkfs.xfs, mkfs.btrfs, mkntfs, cryptsetup) and copied while their file
systems are mounted and being written, right after an fsync: the journals
are dirty, as in a crash-consistent snapshot. Each test checks that a plain
read-only mount without journal replay (noload, norecovery, nologreplay)
really misses the fsync'd file, so that seeing it through cbtfs-browse
proves the replay."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import BUILD, REPO_TOOL, import_image, new_repo_location, root_only_file, run

BROWSE = os.path.abspath(os.path.join(BUILD, "src", "cbtfs-browse"))
MIB = 1 << 20
RUN_BASE = "/run/cbtfs-browse"
OVERLAY_BASE = "/var/tmp/cbtfs-browse"
T1, T2 = "2026-11-24T03:00:00Z", "2026-11-25T03:00:00Z"
P1, P2 = "2026-11-24T030000Z", "2026-11-25T030000Z"
VDI_A = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"
VDI_B = "1b2c3d4e-5f6a-4b7c-8d8e-9fa0b1c2d3e4"

if not os.access(BROWSE, os.X_OK):
    pytest.exit(f"{BROWSE} is not built", returncode=1)


def private_dir(base, d):
    """As browse::private_dir: FNV-1a of the canonical DIR."""
    h = 0xcbf29ce484222325
    for c in os.path.realpath(d).encode():
        h = ((h ^ c) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{base}/{h:016x}"


def browse(*args, check=True, **kw):
    return run(BROWSE, *args, check=check, **kw)


def mounts():
    """Mount points from mountinfo, unescaped."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            out.append(mnt.encode().decode("unicode_escape"))
    return out


def loops_of(prefix):
    out = []
    for name in os.listdir("/sys/block"):
        try:
            back = open(f"/sys/block/{name}/loop/backing_file").read().strip()
        except OSError:
            continue
        if back.startswith(prefix):
            out.append(name)
    return out


def assert_clean(d):
    d = os.path.realpath(d)
    priv = private_dir(RUN_BASE, d)
    left = [m for m in mounts() if m == d or m.startswith(d + "/") or m.startswith(priv)]
    assert not left, f"still mounted: {left}"
    assert not loops_of(priv), f"loop devices left: {loops_of(priv)}"
    assert not os.path.exists(priv), f"{priv} left behind"
    assert not os.path.exists(private_dir(OVERLAY_BASE, d))


class Browses:
    """Browse directories made by a test, undone in the end whatever happened."""

    def __init__(self, tmp_path):
        self.tmp, self.dirs = tmp_path, []

    def dir(self, name):
        d = self.tmp / name
        d.mkdir()
        self.dirs.append(str(d))
        return str(d)

    def undo_all(self):
        for d in self.dirs:
            subprocess.run([BROWSE, "-u", d], capture_output=True)
            for m in reversed(mounts()):
                if m == d or m.startswith(d + "/"):
                    subprocess.run(["umount", "-l", m], capture_output=True)


@pytest.fixture
def browses(tmp_path):
    b = Browses(tmp_path)
    yield b
    b.undo_all()


# ---- guest disks -------------------------------------------------------------


class Loop:
    """A loop device over part of an image, as the guest's block device."""

    def __init__(self, image, offset=0, size=None, read_only=False):
        args = ["losetup", "--find", "--show", "--offset", str(offset)] + (["--read-only"] if read_only else [])
        if size:
            args += ["--sizelimit", str(size)]
        self.dev = run(*args, image).stdout.strip()

    def close(self):
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None


class Guest:
    """The file systems of one guest disk, mounted read-write, with the files
    each should hold: written, fsync'd, and snapshot while mounted."""

    def __init__(self, tmp_path, image):
        self.image, self.tmp = str(image), tmp_path
        self.loops, self.mnts, self.expect = [], {}, {}

    def add(self, name, offset, size, fstype, mkfs=True, mount_opts=""):
        loop = Loop(self.image, offset, size)
        self.loops.append(loop)
        if mkfs:
            if fstype == "ext4":
                run("mkfs.ext4", "-q", "-F", loop.dev)
            elif fstype == "xfs":
                run("mkfs.xfs", "-q", "-f", loop.dev)
            elif fstype == "ntfs":
                run("mkntfs", "-Q", "-F", loop.dev)
        d = self.tmp / f"guest-{os.path.basename(self.image)}-{name}"
        d.mkdir(exist_ok=True)
        if fstype == "ntfs":
            run("ntfs-3g", loop.dev, d)
        else:
            run("mount", "-t", fstype, *(["-o", mount_opts] if mount_opts else []), loop.dev, d)
        self.mnts[name] = str(d)
        self.expect.setdefault(name, {})
        return str(d)

    def write(self, name, rel, data):
        """Writes and fsyncs a file (and its directory): durable in the guest."""
        p = os.path.join(self.mnts[name], rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(os.path.dirname(p), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        self.expect[name][rel] = data

    def remove(self, name, rel):
        os.unlink(os.path.join(self.mnts[name], rel))
        dfd = os.open(os.path.dirname(os.path.join(self.mnts[name], rel)), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        del self.expect[name][rel]

    def snapshot(self, dest):
        """Copies the disk as it is now, file systems still mounted: what a
        hypervisor's snapshot of a running guest holds."""
        run("cp", "--sparse=always", self.image, dest)
        return {k: dict(v) for k, v in self.expect.items()}

    def close(self):
        for d in self.mnts.values():
            subprocess.run(["umount", d], capture_output=True)
        self.mnts = {}
        for l in self.loops:
            l.close()
        self.loops = []


def sparse_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def gpt_ext4_xfs(path):
    """A GPT disk: partition 1 ext4 (64 MiB), partition 2 XFS (320 MiB)."""
    sparse_file(path, 400 * MIB)
    run("sgdisk", "-n1:2048:+64M", "-t1:8300", "-n2:0:+320M", "-t2:8300", path)
    return [(part_start(path, n), part_size(path, n)) for n in (1, 2)]


def part_start(path, n):
    out = run("sgdisk", f"-i{n}", path).stdout
    return int(out.split("First sector: ")[1].split()[0]) * 512


def part_size(path, n):
    out = run("sgdisk", f"-i{n}", path).stdout
    first = int(out.split("First sector: ")[1].split()[0])
    last = int(out.split("Last sector: ")[1].split()[0])
    return (last - first + 1) * 512


def rnd(seed, n):
    return random.Random(seed).randbytes(n)


def tree(root):
    """Every regular file below root by content (lost+found and NTFS's system files aside)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("lost+found", "System Volume Information")]
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def assert_tree(root, expect):
    got = tree(root)
    assert sorted(got) == sorted(expect), f"{root}: files {sorted(got)} != {sorted(expect)}"
    for k in expect:
        assert got[k] == expect[k], f"{root}/{k} differs"


def without_replay_misses(image, offset, size, fstype, rel, data, tmp_path):
    """A read-only mount that skips the journal (noload / norecovery) does
    not show the fsync'd file: otherwise the test would prove nothing."""
    # (losetup --read-only, not blockdev --setro: that flag outlives the
    # loop device and would make the next user's read-only.)
    loop = Loop(image, offset, size, read_only=True)
    d = tmp_path / f"noreplay-{fstype}-{offset}"
    d.mkdir(exist_ok=True)
    try:
        opts = {"ext4": "ro,noload", "xfs": "ro,norecovery,nouuid", "btrfs": "ro,rescue=nologreplay"}[fstype]
        run("mount", "-t", fstype, "-o", opts, loop.dev, d)
        try:
            p = os.path.join(d, rel)
            seen = None
            if os.path.exists(p):
                with open(p, "rb") as f:
                    seen = f.read()
            assert seen != data, f"{fstype}: {rel} is there without journal replay: the snapshot was not dirty"
        finally:
            umount(d)
    finally:
        loop.close()


def umount(d):
    """umount, retried a moment: a file system just read may be busy briefly."""
    for _ in range(50):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    run("umount", d)


def parse_listing(out):
    """{name: (type, what)} from cbtfs-browse's summary."""
    res = {}
    for line in out.splitlines():
        if line.startswith("  "):
            parts = line.split(None, 2)
            res[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return res


# ---- tests -------------------------------------------------------------------


@pytest.fixture
def gpt_points(tmp_path, repo):
    return make_gpt_points(tmp_path, repo)


def make_gpt_points(tmp_path, repo):
    """VDI A: two points of a GPT disk with ext4 and XFS, each taken while
    mounted and written; VDI B: a clone of that disk (same file system
    uuids) with other files."""
    disk = tmp_path / "a.img"
    (o1, s1), (o2, s2) = gpt_ext4_xfs(disk)
    g = Guest(tmp_path, disk)
    try:
        g.add("part1", o1, s1, "ext4")
        g.add("part2", o2, s2, "xfs")
        g.write("part1", "etc/hostname", b"web01\n")
        g.write("part1", "big.bin", rnd(1, 3 * MIB + 123))
        g.write("part2", "data/db.bin", rnd(2, 2 * MIB))
        g.write("part2", "data/last.txt", b"xfs fsync'd before point 1\n")
        g.write("part1", "last.txt", b"ext4 fsync'd before point 1\n")
        exp1 = g.snapshot(tmp_path / "a1.img")
        g.write("part1", "last.txt", b"ext4 changed before point 2\n")
        g.write("part1", "new/p2.txt", b"only in point 2\n")
        g.write("part2", "data/db.bin", rnd(3, 2 * MIB))
        g.write("part2", "p2.txt", b"xfs fsync'd before point 2\n")
        exp2 = g.snapshot(tmp_path / "a2.img")
    finally:
        g.close()
    # The clone: the disk copied (clean now), then changed in its own guest.
    shutil.copyfile(disk, tmp_path / "b.img")
    c = Guest(tmp_path, tmp_path / "b.img")
    try:
        c.add("part1", o1, s1, "ext4", mkfs=False)
        c.add("part2", o2, s2, "xfs", mkfs=False)
        c.expect = {k: dict(v) for k, v in exp2.items()}
        c.remove("part1", "new/p2.txt")
        c.write("part1", "clone.txt", b"I am the clone\n")
        c.write("part2", "data/db.bin", rnd(4, 1 * MIB))
        expb = c.snapshot(tmp_path / "b1.img")
    finally:
        c.close()
    without_replay_misses(tmp_path / "a2.img", o1, s1, "ext4", "new/p2.txt", b"only in point 2\n", tmp_path)
    without_replay_misses(tmp_path / "a2.img", o2, s2, "xfs", "p2.txt", b"xfs fsync'd before point 2\n", tmp_path)
    without_replay_misses(tmp_path / "b1.img", o1, s1, "ext4", "clone.txt", b"I am the clone\n", tmp_path)
    import_image(repo, tmp_path / "a1.img", VDI_A, T1, vm="web01", name="root disk")
    import_image(repo, tmp_path / "a2.img", VDI_A, T2, vm="web01", name="root disk")
    import_image(repo, tmp_path / "b1.img", VDI_B, T2, vm="web01-clone", name="root disk")
    return {"a1": exp1, "a2": exp2, "b": expb}


def test_browse_replays_journals_and_shows_every_file(gpt_points, repo, browses):
    d = browses.dir("view")
    p = browse(repo, "web01/root disk", P2, d)
    listing = parse_listing(p.stdout)
    assert listing["part1"] == ("ext4", f"{d}/part1"), p.stdout
    assert listing["part2"] == ("xfs", f"{d}/part2"), p.stdout
    assert sorted(os.listdir(d)) == ["part1", "part2"]
    for name in ("part1", "part2"):
        assert_tree(f"{d}/{name}", gpt_points["a2"][name])
    # Read-only to everyone, root included, and the view itself too.
    for target in (f"{d}/part1/new", f"{d}/part2", d):
        with pytest.raises(OSError):
            open(os.path.join(target, "x"), "w")
    # No private mount inside DIR; the repository is not written.
    assert [m for m in mounts() if m.startswith(d)] == [d, f"{d}/part1", f"{d}/part2"]
    browse("-u", d)
    assert_clean(d)
    assert os.listdir(d) == []
    # Safe to repeat.
    p = browse("-u", d)
    assert "nothing to undo" in p.stdout
    # The repository still verifies: nothing was written to it.
    run(os.path.join(BUILD, "src", "cbtfs-repo"), "verify", repo)


def test_an_encrypted_repository_browses_with_its_key_from_the_environment(tmp_path, browses, monkeypatch):
    """File-level restore from an encrypted repository: the key comes as for
    every other command (here a root-only passphrase file named in the
    environment); without it, a clear error and nothing left behind."""
    secret = root_only_file(tmp_path / "passphrase", "file-level restore from an encrypted backup\n")
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(secret))
    repo = new_repo_location(tmp_path, "enc")
    assert "encrypted" in run(REPO_TOOL, "init", "--encryption", "passphrase", repo).stdout
    points = make_gpt_points(tmp_path, repo)
    d = browses.dir("view")
    p = browse(repo, "web01/root disk", P2, d)
    listing = parse_listing(p.stdout)
    assert listing["part1"] == ("ext4", f"{d}/part1") and listing["part2"] == ("xfs", f"{d}/part2"), p.stdout
    for name in ("part1", "part2"):
        assert_tree(f"{d}/{name}", points["a2"][name])
    browse("-u", d)
    assert_clean(d)
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    p = browse(repo, "web01/root disk", P2, d, check=False)
    assert p.returncode == 7 and "encrypted" in p.stderr, p.stdout + p.stderr
    assert_clean(d)
    assert os.listdir(d) == []


def test_points_and_clones_browse_at_once(gpt_points, repo, browses):
    d1, d2, db, dl = (browses.dir(n) for n in ("p1", "p2", "clone", "latest"))
    browse(repo, VDI_A, P1, d1)
    browse(repo, VDI_A, P2, d2)
    browse(repo, VDI_B, db)                  # latest by default
    browse(repo, "web01/root disk", "latest", dl)
    for d, exp in ((d1, gpt_points["a1"]), (d2, gpt_points["a2"]), (db, gpt_points["b"]), (dl, gpt_points["a2"])):
        for name in ("part1", "part2"):
            assert_tree(f"{d}/{name}", exp[name])
    # One undone, the others still there and intact.
    browse("-u", d2)
    assert_clean(d2)
    assert_tree(f"{db}/part1", gpt_points["b"]["part1"])
    assert_tree(f"{d1}/part2", gpt_points["a1"]["part2"])
    for d in (d1, db, dl):
        browse("-u", d)
        assert_clean(d)


def test_mbr_with_ntfs_in_primary_and_logical(tmp_path, repo, browses, monkeypatch):
    if not shutil.which("mkntfs") or not shutil.which("ntfs-3g"):
        pytest.skip("ntfs-3g is not installed")
    disk = sparse_file(tmp_path / "win.img", 96 * MIB)
    run("sfdisk", "-q", disk, input="label: dos\n"
        "start=2048, size=40960, type=7\n"
        "start=43008, size=153600, type=5\n"
        "start=45056, size=61440, type=7\n"
        "start=108544, size=40960, type=83\n")
    g = Guest(tmp_path, disk)
    try:
        g.add("part1", 2048 * 512, 40960 * 512, "ntfs")
        g.add("part5", 45056 * 512, 61440 * 512, "ntfs")
        g.add("part6", 108544 * 512, 40960 * 512, "ext4")
        g.write("part1", "Windows/win.ini", b"[fonts]\r\n")
        g.write("part1", "Users/ann/report.docx", rnd(5, 700000))
        g.write("part5", "Data/photo.jpg", rnd(6, 1500000))
        g.write("part6", "dirty.txt", b"ext4 in a logical partition\n")
        # Partition 5 as Windows leaves it hibernated (or with fast startup):
        # ntfs-3g refuses to mount it read-write.
        g.write("part5", "hiberfil.sys", b"HIBR" + bytes(8188))
    finally:
        g.close()
    exp = {k: dict(v) for k, v in g.expect.items()}
    del exp["part5"]["hiberfil.sys"]  # removed, in the overlay only
    shutil.copyfile(disk, tmp_path / "win1.img")
    hib = Loop(tmp_path / "win1.img", 45056 * 512, 61440 * 512)
    try:
        (tmp_path / "hib").mkdir()
        # ntfs-3g falls back to read-only, which is refused elsewhere.
        p = run("ntfs-3g", hib.dev, tmp_path / "hib", check=False)
        if p.returncode == 0:
            run("umount", tmp_path / "hib")
        assert "hibernat" in p.stdout + p.stderr, p
    finally:
        subprocess.run(["umount", tmp_path / "hib"], capture_output=True)
        hib.close()
    # The ext4 of partition 6, copied while mounted.
    g = Guest(tmp_path, tmp_path / "win1.img")
    try:
        g.add("part6", 108544 * 512, 40960 * 512, "ext4", mkfs=False)
        g.expect["part6"] = dict(exp["part6"])
        g.write("part6", "dirty.txt", b"ext4 in a logical partition, changed\n")
        exp["part6"] = g.snapshot(tmp_path / "win1.snap")["part6"]
    finally:
        g.close()
    os.replace(tmp_path / "win1.snap", tmp_path / "win1.img")
    without_replay_misses(tmp_path / "win1.img", 108544 * 512, 40960 * 512, "ext4", "dirty.txt",
                          b"ext4 in a logical partition, changed\n", tmp_path)
    import_image(repo, tmp_path / "win1.img", VDI_A, T1, vm="win", name="C")
    d = browses.dir("win")
    p = browse(repo, "win/C", d)
    listing = parse_listing(p.stdout)
    assert listing["part1"] == ("ntfs", f"{d}/part1"), p.stdout
    assert listing["part5"] == ("ntfs", f"{d}/part5"), p.stdout
    assert listing["part6"] == ("ext4", f"{d}/part6"), p.stdout
    for name in ("part1", "part5", "part6"):
        assert_tree(f"{d}/{name}", exp[name])
    with pytest.raises(OSError):
        open(f"{d}/part1/new.txt", "w")
    browse("-u", d)
    assert_clean(d)
    # The same from an encrypted copy of the repository, the passphrase in a
    # root-only file: NTFS, hibernated or not, reads as from the plain one.
    secret = root_only_file(tmp_path / "passphrase", "windows guest, encrypted copy\n")
    enc = new_repo_location(tmp_path, "enc")
    run(REPO_TOOL, "--passphrase-file", secret, "init", "--encryption", "passphrase", enc)
    run(REPO_TOOL, "--passphrase-file", secret, "copy", repo, enc)
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(secret))
    p = browse(enc, "win/C", d)
    assert parse_listing(p.stdout) == listing, p.stdout
    for name in ("part1", "part5", "part6"):
        assert_tree(f"{d}/{name}", exp[name])
    browse("-u", d)
    assert_clean(d)


def test_whole_disk_file_system(tmp_path, repo, browses):
    disk = sparse_file(tmp_path / "whole.img", 64 * MIB)
    g = Guest(tmp_path, disk)
    try:
        g.add("disk", 0, None, "ext4")
        g.write("disk", "var/log/syslog", rnd(7, 200000))
        g.write("disk", "fsynced.txt", b"just before the snapshot\n")
        exp = g.snapshot(tmp_path / "whole1.img")
    finally:
        g.close()
    without_replay_misses(tmp_path / "whole1.img", 0, None, "ext4", "fsynced.txt",
                          b"just before the snapshot\n", tmp_path)
    import_image(repo, tmp_path / "whole1.img", VDI_A, T1)
    d = browses.dir("whole")
    p = browse(repo, VDI_A, P1, d)
    assert parse_listing(p.stdout) == {"disk": ("ext4", f"{d}/disk")}, p.stdout
    assert_tree(f"{d}/disk", exp["disk"])
    browse("-u", d)
    assert_clean(d)


def test_luks_and_swap_are_reported_not_mounted(tmp_path, repo, browses):
    if not shutil.which("cryptsetup"):
        pytest.skip("cryptsetup is not installed (apt-get install cryptsetup-bin)")
    disk = sparse_file(tmp_path / "enc.img", 96 * MIB)
    run("sgdisk", "-n1:2048:+32M", "-n2:0:+16M", "-t2:8200", "-n3:0:+32M", "-n4:0:+4M", "-n5:0:+8M", disk)
    key = tmp_path / "key"
    key.write_bytes(b"secret")
    l1 = Loop(disk, part_start(disk, 1), part_size(disk, 1))
    try:
        run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", "--key-file", key, l1.dev)
    finally:
        l1.close()
    l2 = Loop(disk, part_start(disk, 2), part_size(disk, 2))
    try:
        run("mkswap", l2.dev)
    finally:
        l2.close()
    l5 = Loop(disk, part_start(disk, 5), part_size(disk, 5))
    try:
        run("mkfs.vfat", l5.dev)
    finally:
        l5.close()
    g = Guest(tmp_path, disk)
    try:
        g.add("part3", part_start(disk, 3), part_size(disk, 3), "ext4")
        g.write("part3", "boot.txt", b"plain /boot\n")
        exp = g.snapshot(tmp_path / "enc1.img")
    finally:
        g.close()
    import_image(repo, tmp_path / "enc1.img", VDI_A, T1)
    d = browses.dir("enc")
    p = browse(repo, VDI_A, d)
    listing = parse_listing(p.stdout)
    assert listing["part1"][0] == "crypto_LUKS" and "encrypted (LUKS)" in listing["part1"][1], p.stdout
    assert listing["part2"][0] == "swap" and "not mounted" in listing["part2"][1], p.stdout
    assert listing["part4"][0] == "-" and "no file system found" in listing["part4"][1], p.stdout
    assert listing["part3"] == ("ext4", f"{d}/part3")
    # vfat where the kernel has it; said so where it has not, and no failure.
    has_vfat = "vfat" in open("/proc/filesystems").read()
    assert listing["part5"] == ("vfat", f"{d}/part5" if has_vfat else "not mounted: this kernel has no vfat driver")
    assert sorted(os.listdir(d)) == ["part3"] + (["part5"] if has_vfat else [])
    assert_tree(f"{d}/part3", exp["part3"])
    browse("-u", d)
    assert_clean(d)


def test_nothing_mountable_undoes_itself(tmp_path, repo, browses):
    disk = sparse_file(tmp_path / "empty.img", 8 * MIB)
    import_image(repo, disk, VDI_A, T1)
    d = browses.dir("empty")
    p = browse(repo, VDI_A, d, check=False)
    assert p.returncode == 1 and "nothing to browse" in p.stderr
    assert "no file system found" in p.stdout
    assert_clean(d)


def test_bad_requests(gpt_points, repo, browses, tmp_path):
    d = browses.dir("bad")
    for args, msg in (((repo, "web01/no such disk", d), "no VDI named"),
                      ((repo, "nope", d), "no VDI nope"),
                      ((repo, VDI_A, "2020-01-01T000000Z", d), "has no point"),
                      ((repo, VDI_A, tmp_path / "missing"), "No such file")):
        p = browse(*args, check=False)
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)
    p = browse(tmp_path / "not-a-repo", VDI_A, d, check=False)
    assert p.returncode == 3, p.stderr
    # A second browse into the same DIR is refused, and leaves the first alone.
    browse(repo, VDI_A, d)
    p = browse(repo, VDI_A, P1, d, check=False)
    assert p.returncode == 2 and "browsed already" in p.stderr
    assert os.path.ismount(f"{d}/part2")
    browse("-u", d)
    assert_clean(d)


def test_needs_root(gpt_points, repo, tmp_path):
    os.chmod(tmp_path, 0o755)
    p = subprocess.run([BROWSE, str(repo), VDI_A, str(tmp_path)], capture_output=True, text=True,
                       user=65534, group=65534, extra_groups=[])
    assert p.returncode == 2 and "must be run as root" in p.stderr
    p = subprocess.run([BROWSE, "-u", str(tmp_path)], capture_output=True, text=True,
                       user=65534, group=65534, extra_groups=[])
    assert p.returncode == 2 and "must be run as root" in p.stderr


def start_paused(repo, vdi, d, step):
    env = dict(os.environ, CBTFS_BROWSE_TEST_PAUSE_AFTER=str(step))
    proc = subprocess.Popen([BROWSE, str(repo), vdi, d], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stderr.readline()
    return proc, line


def test_undo_after_kill_at_every_step(gpt_points, repo, browses):
    d = browses.dir("killed")
    # Steps: cbtfs, tmpfs, loop+mount per partition, remount read-only.
    step = 1
    while True:
        proc, line = start_paused(repo, VDI_A, d, step)
        try:
            if "paused" not in line:  # ran to the end: every step has been covered
                assert proc.wait(timeout=60) == 0, proc.stderr.read()
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        p = browse("-u", d)
        assert "undone" in p.stdout
        assert_clean(d)
        step += 1
    assert step >= 7
    browse("-u", d)
    assert_clean(d)


def test_undo_after_kill_at_random_moments(gpt_points, repo, browses):
    d = browses.dir("random")
    r = random.Random(42)
    t0 = time.monotonic()
    run(BROWSE, repo, VDI_A, d)
    full = time.monotonic() - t0
    browse("-u", d)
    for _ in range(6):
        proc = subprocess.Popen([BROWSE, str(repo), VDI_A, d], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(r.uniform(0, full))
        proc.kill()
        proc.wait()
        browse("-u", d)
        assert_clean(d)


def test_undo_while_a_browse_is_setting_up_is_refused(gpt_points, repo, browses):
    d = browses.dir("busy")
    proc, line = start_paused(repo, VDI_A, d, 3)
    try:
        assert "paused" in line
        p = browse("-u", d, check=False)
        assert p.returncode == 6 and f"pid {proc.pid}" in p.stderr and "still setting up" in p.stderr
    finally:
        proc.kill()
        proc.wait()
    browse("-u", d)
    assert_clean(d)


def test_undo_refuses_while_in_use_and_can_be_repeated(gpt_points, repo, browses):
    d = browses.dir("inuse")
    browse(repo, VDI_A, d)
    f = open(f"{d}/part1/big.bin", "rb")
    try:
        p = browse("-u", d, check=False)
        assert p.returncode == 5 and "in use" not in p.stdout and "cannot unmount" in p.stderr
    finally:
        f.close()
    browse("-u", d)
    assert_clean(d)


def test_btrfs_log_tree_replayed(tmp_path, repo, browses):
    if not shutil.which("mkfs.btrfs"):
        pytest.skip("btrfs-progs is not installed")
    if "btrfs" not in open("/proc/filesystems").read():
        pytest.skip("this kernel has no btrfs")
    disk = sparse_file(tmp_path / "b.img", 160 * MIB)
    run("sgdisk", "-n1:2048:+150M", disk)
    g = Guest(tmp_path, disk)
    try:
        loop = Loop(disk, part_start(disk, 1), part_size(disk, 1))
        g.loops.append(loop)
        run("mkfs.btrfs", "-q", "-f", loop.dev)
        d = tmp_path / "guest-btrfs"
        d.mkdir()
        run("mount", "-t", "btrfs", loop.dev, d)
        g.mnts["part1"], g.expect["part1"] = str(d), {}
        g.write("part1", "home/ann/notes.txt", rnd(8, 300000))
        run("sync")
        g.write("part1", "fsynced.txt", b"in the log tree only\n")
        exp = g.snapshot(tmp_path / "b1.img")
    finally:
        g.close()
    without_replay_misses(tmp_path / "b1.img", part_start(disk, 1), part_size(disk, 1), "btrfs", "fsynced.txt",
                          b"in the log tree only\n", tmp_path)
    import_image(repo, tmp_path / "b1.img", VDI_A, T1)
    d = browses.dir("btrfs")
    p = browse(repo, VDI_A, d)
    assert parse_listing(p.stdout)["part1"] == ("btrfs", f"{d}/part1"), p.stdout
    assert_tree(f"{d}/part1", exp["part1"])
    browse("-u", d)
    assert_clean(d)


def test_prune_during_a_browse_keeps_the_point(gpt_points, repo, browses):
    """An admin browsing last week's point while the nightly prune runs: the
    point stays until the browse is undone, and its files stay readable."""
    d = browses.dir("old")
    browse(repo, VDI_A, P1, d)
    out = run(os.path.join(BUILD, "src", "cbtfs-repo"), "prune", "--keep-last", "1", repo, VDI_A).stdout
    assert f"kept, in use: {VDI_A}/{P1}.raw" in out, out
    assert_tree(f"{d}/part1", gpt_points["a1"]["part1"])
    assert_tree(f"{d}/part2", gpt_points["a1"]["part2"])
    browse("-u", d)
    assert_clean(d)
    out = run(os.path.join(BUILD, "src", "cbtfs-repo"), "prune", "--keep-last", "1", repo, VDI_A).stdout
    assert f"removed {VDI_A}/{P1}.raw" in out, out
    run(os.path.join(BUILD, "src", "cbtfs-repo"), "verify", repo)
