"""The usability defects of issue 12 item 13, each walked the way a user
walks it: the real binaries, the kernel mount (the daemonized one where
that is what users start), unprivileged users where they are the ones who
meet the problem."""

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import (BLOCK, CBTFS, FORMAT, REPO_TOOL, Mount, files_equal, flip_object_byte, import_image, ls_json,
                      pack_of_point, repo_tool, run)
from xapi import Sim

INGEST = os.path.join(os.path.dirname(REPO_TOOL), "cbtfs-ingest")
VDI = "5d1c0b7e-3a2f-4e8d-9c6b-7a8f9e0d1c2b"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MIB = 1 << 20


def image(path, nblocks, seed):
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(nblocks * BLOCK))
    return str(path)


def mounts_at(path):
    """How many mounts /proc/self/mountinfo lists at path (without stat()ing it)."""
    with open("/proc/self/mountinfo") as f:
        return sum(line.split()[4] == str(path) for line in f)


def unmount_all(path):
    while mounts_at(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def shared_dir():
    """A directory other users can traverse (pytest's tmp_path is 0700 root)."""
    d = tempfile.mkdtemp(prefix="cbtfs-usability-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    unmount_all(os.path.join(d, "mnt"))
    shutil.rmtree(d, ignore_errors=True)


# 1
def test_a_file_as_mount_point_is_refused(tmp_path, repo):
    target = tmp_path / "not-a-dir"
    target.write_bytes(b"x")
    try:
        p = run(CBTFS, repo, target, check=False)
        assert p.returncode == 2, (p.returncode, p.stderr)
        assert "is not a directory" in p.stderr, p.stderr
        assert mounts_at(target) == 0
    finally:
        unmount_all(target)


# 2
def test_a_second_mount_on_a_cbtfs_mount_is_refused(tmp_path, repo, mnt):
    import_image(repo, image(tmp_path / "a.img", 4, 1), VDI, "2026-11-20T03:00:00Z")
    with Mount(repo, mnt) as m:
        try:
            p = run(CBTFS, repo, mnt, check=False)
            assert p.returncode == 2, (p.returncode, p.stderr)
            assert f"already mounted at {mnt}" in p.stderr and f"fusermount3 -u {mnt}" in p.stderr, p.stderr
            assert mounts_at(mnt) == 1
            # the same through a relative path with a trailing slash
            p = run(CBTFS, repo, "mnt/", check=False, cwd=tmp_path)
            assert p.returncode == 2 and "already mounted" in p.stderr, p.stderr
            assert mounts_at(mnt) == 1
            # found without looking at the mount point: a hung daemon there does not hang the check
            m.proc.send_signal(signal.SIGSTOP)
            try:
                p = run(CBTFS, repo, mnt, check=False, timeout=20)
            finally:
                m.proc.send_signal(signal.SIGCONT)
            assert p.returncode == 2 and "already mounted" in p.stderr, p.stderr
        finally:
            while mounts_at(mnt) > 1:  # without the fix: the stacked one
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        assert os.listdir(m.path(VDI)) == ["2026-11-20T030000Z.raw", "latest.raw"]


# 3
def test_an_unknown_command_is_named():
    p = repo_tool("frob", "/tmp", check=False)
    assert p.returncode == 2
    assert "unknown command 'frob'" in p.stderr, p.stderr
    for c in ("init", "import", "ls", "verify", "prune", "restore", "forget"):
        assert c in p.stderr
    p = repo_tool(check=False)
    assert p.returncode == 2 and "a command is required" in p.stderr and "verify" in p.stderr, p.stderr
    assert repo_tool("--version").returncode == 0


# 4
def test_one_exit_status_table_for_every_command(tmp_path, repo, mnt, shared_dir):
    env = dict(os.environ, CBTFS_PASSWORD="x")
    ingest = [INGEST, "--xapi", "http://127.0.0.1:9", "--vdi", VDI]
    # 3: the repository cannot be opened: missing, not a repository, not readable
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "missing", tmp_path / "empty"):
        assert run(CBTFS, where, mnt, check=False).returncode == 3
        assert repo_tool("ls", where, check=False).returncode == 3
        assert run(*ingest, where, check=False, env=env).returncode == 3
    private = os.path.join(shared_dir, "private-repo")
    repo_tool("init", private)  # 0700, root's
    smnt = os.path.join(shared_dir, "mnt")
    os.mkdir(smnt)
    os.chown(smnt, 65534, 65534)
    p = run(*NOBODY, CBTFS, private, smnt, check=False)
    assert p.returncode == 3 and "Permission denied" in p.stderr, p.stderr
    p = run(*NOBODY, REPO_TOOL, "ls", private, check=False)
    assert p.returncode == 3 and "Permission denied" in p.stderr, p.stderr
    p = run(*NOBODY, *ingest, private, check=False, env=env)
    assert p.returncode == 3, p.stderr
    # 2: usage
    assert run(CBTFS, repo, mnt, "-o", "mode=0644", check=False).returncode == 2
    assert repo_tool("ls", check=False).returncode == 2
    assert run(INGEST, "--xapi", "http://127.0.0.1:9", repo, check=False, env=env).returncode == 2
    # 6: another process holds the VDI's lock
    img = image(tmp_path / "a.img", 4, 1)
    import_image(repo, img, VDI, "2026-11-20T03:00:00Z")
    fd = os.open(os.path.join(str(repo), "vdis", VDI, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = repo_tool("import", "--vdi", VDI, repo, img, check=False)
        assert p.returncode == 6 and "being written by another process" in p.stderr, p.stderr
        p = repo_tool("forget", repo, VDI, check=False)
        assert p.returncode == 6, p.stderr
    finally:
        os.close(fd)
    # 1: the job ran but failed in part (verify found damage)
    flip_object_byte(repo, pack_of_point(repo, VDI), 5000)
    assert repo_tool("verify", repo, check=False).returncode == 1


# 4: a XAPI login refused is 4 for cbtfs-ingest and for cbtfs-repo restore --xapi
def test_a_refused_xapi_login_exits_4_from_every_command(tmp_path, repo):
    sim = Sim(tmp_path, [{"name": "vm", "disks": [{"name": "d", "size": 4 * MIB}]}])
    try:
        disk = sim.disks_of("vm")[0]
        import_image(repo, image(tmp_path / "a.img", 64, 2), VDI, "2026-11-20T03:00:00Z")
        bad = tmp_path / "bad-password"
        bad.write_text("wrong\n")
        p = run(INGEST, "--xapi", sim.url, "--password-file", bad, "--ca-file", sim.ca_file, "--vdi", disk["uuid"],
                repo, check=False)
        assert p.returncode == 4 and "wrong user name or password" in p.stderr, p.stderr
        sr = "00000000-0000-4000-8000-000000000000"  # never asked for: the login comes first
        p = run(REPO_TOOL, "restore", "--xapi", sim.url, "--password-file", bad, "--ca-file", sim.ca_file, "--sr", sr,
                repo, VDI, "latest", check=False)
        assert p.returncode == 4, (p.returncode, p.stderr)
        assert "wrong user name or password" in p.stderr or "SESSION_AUTHENTICATION_FAILED" in p.stderr, p.stderr
    finally:
        sim.stop()


# 5
def test_ls_shows_control_characters_escaped(tmp_path, repo):
    vm, disk = "evil\x1b]0;owned\x07vm", "disk\x1b[2J\x9b1m\u00e9"
    import_image(repo, image(tmp_path / "a.img", 2, 1), VDI, "2026-11-20T03:00:00Z", vm=vm, name=disk)
    out = repo_tool("ls", repo).stdout + repo_tool("info", repo, VDI).stdout
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out, repr(out)
    assert "evil\\x1b]0;owned\\x07vm" in out, out
    assert "disk\\x1b[2J\\xc2\\x9b1m\u00e9" in out, out  # printable UTF-8 stays
    v = ls_json(repo)["vdis"][0]
    assert (v["vm_name"], v["name"]) == (vm, disk)  # exact in JSON


# 6
def temporaries(repo):
    """Unfinished files beside the packs: the VDI's own (format 1) or the
    shared store's (format 2)."""
    root = os.path.join(str(repo), "vdis", VDI, "packs") if FORMAT == "1" else os.path.join(str(repo), "store", "packs")
    return [f for _, _, files in os.walk(root) for f in files if f.startswith(".tmp.")]


def start_stalled_import(repo, size_blocks, fed_blocks):
    """An import from a pipe that got fed_blocks and then waits for more."""
    p = subprocess.Popen([REPO_TOOL, "import", "-q", "--vdi", VDI, "--size", str(size_blocks * BLOCK), str(repo),
                          "/dev/stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(random.Random(5).randbytes(fed_blocks * BLOCK))
    p.stdin.flush()
    deadline = time.monotonic() + 20
    while not temporaries(repo):
        if p.poll() is not None or time.monotonic() >= deadline:
            p.kill()  # reading its stderr first would wait for an import that waits for its input
            raise AssertionError(p.communicate()[1])
        time.sleep(0.02)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_import_cleanly(tmp_path, repo, sig):
    p = start_stalled_import(repo, 1024, 256)
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == -sig, (p.returncode, err)
    assert b"interrupted" in err and b"nothing was committed" in err, err
    assert temporaries(repo) == []  # none left for the next run
    assert ls_json(repo)["vdis"] == []


def test_verify_reports_what_a_killed_writer_left(tmp_path, repo):
    p = start_stalled_import(repo, 1024, 256)
    p.kill()
    p.communicate()
    if FORMAT == "1":
        v = repo_tool("verify", repo)
        assert f"VDI {VDI}: 1 unfinished temporary file(s) left by an interrupted writer" in v.stderr, v.stderr
        assert "the next writer of that VDI removes them" in v.stderr
        import_image(repo, image(tmp_path / "a.img", 4, 1), VDI, "2026-11-20T03:00:00Z")
        v = repo_tool("verify", repo)
        assert "unfinished" not in v.stderr, v.stderr
    else:  # the shared store's: the next collection removes them
        out = repo_tool("gc", "-n", repo).stdout
        assert "1 unfinished file(s) of backups that died would be removed" in out, out
        assert "1 unfinished file(s) of backups that died removed" in repo_tool("gc", repo).stdout
    assert temporaries(repo) == []


# 7
def test_import_from_a_pipe(tmp_path, repo, mnt):
    img = image(tmp_path / "a.img", 40, 3)
    with open(img, "r+b") as f:  # a size that is not a multiple of 64 KiB
        f.truncate(40 * BLOCK - 1000)
    size = os.path.getsize(img)
    p = run("sh", "-c", f'cat "$1" | "$2" import --vdi {VDI} --time 2026-11-20T03:00:00Z "$3" /dev/stdin',
            "sh", img, REPO_TOOL, repo, check=False)
    assert p.returncode == 2 and "give --size" in p.stderr and "Illegal seek" not in p.stderr, p.stderr
    p = run("sh", "-c", f'cat "$1" | "$2" import --vdi {VDI} --time 2026-11-20T03:00:00Z --size {size + 1} "$3" '
            '/dev/stdin', "sh", img, REPO_TOOL, repo, check=False)
    assert p.returncode == 2 and f"ended after {size} bytes" in p.stderr, p.stderr
    p = run("sh", "-c", f'cat "$1" | "$2" import --vdi {VDI} --time 2026-11-20T03:00:00Z --size {size} "$3" '
            '/dev/stdin', "sh", img, REPO_TOOL, repo)
    assert ls_json(repo)["vdis"][0]["virtual_size"] == size
    # a later state through a pipe is a delta
    with open(img, "r+b") as f:
        f.seek(7 * BLOCK + 3)
        f.write(b"changed")
    p = run("sh", "-c", f'cat "$1" | "$2" import --vdi {VDI} --time 2026-11-21T03:00:00Z --size {size} "$3" '
            '/dev/stdin', "sh", img, REPO_TOOL, repo)
    assert "delta" in p.stdout and " 1 blocks stored" in p.stdout, p.stdout
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(VDI, "latest.raw"), img)
    # --size must agree with a file's own size
    p = repo_tool("import", "--vdi", VDI, "--size", "1G", repo, img, check=False)
    assert p.returncode == 2 and "does not match" in p.stderr, p.stderr


# 8
def test_import_without_vdi_adds_to_the_vdi_with_these_names(tmp_path, repo):
    a = image(tmp_path / "a.img", 16, 4)
    args = ["import", "--vm-name", "web01", "--vdi-name", "system"]
    repo_tool(*args, "--time", "2026-11-20T03:00:00Z", repo, a)
    p = repo_tool(*args, "--time", "2026-11-21T03:00:00Z", repo, a)
    vdis = ls_json(repo)["vdis"]
    assert len(vdis) == 1 and len(vdis[0]["points"]) == 2, vdis
    assert "delta" in p.stdout and f"adding to VDI {vdis[0]['uuid']}" in p.stderr, p.stdout + p.stderr
    # other names: a new VDI, as before
    repo_tool("import", "--vm-name", "db01", "--vdi-name", "system", "--time", "2026-11-20T03:00:00Z", repo, a)
    assert len(ls_json(repo)["vdis"]) == 2
    # names matching two VDIs: refused, both listed
    p = repo_tool("import", "--vdi-name", "system", "--time", "2026-11-22T03:00:00Z", repo, a, check=False)
    assert p.returncode == 2 and "2 VDIs have these names" in p.stderr, p.stderr
    for v in ls_json(repo)["vdis"]:
        assert v["uuid"] in p.stderr
    assert sum(len(v["points"]) for v in ls_json(repo)["vdis"]) == 3


# 9
@pytest.fixture
def helper_mount():
    """mount -t fuse.cbtfs ... : mount(8) -> mount.fuse3 -> a daemonized cbtfs.
    The built binary is named in the source ("PROGRAM#REPO", mount.fuse3's
    own syntax), so no cbtfs needs to be on mount.fuse3's PATH."""
    mounted = []

    def do(repo, mnt, opts, cwd):
        p = run("mount", "-t", "fuse", "-o", opts, f"{CBTFS}#{repo}", mnt, check=False, cwd=cwd)
        assert p.returncode == 0, p.stderr
        mounted.append(str(mnt))
        assert os.path.ismount(mnt)

    yield do
    for m in mounted:
        unmount_all(m)


def test_a_relative_overlay_dir_works_in_the_daemon(tmp_path, repo, mnt, helper_mount):
    img = image(tmp_path / "a.img", 16, 6)
    import_image(repo, img, VDI, "2026-11-20T03:00:00Z")
    (tmp_path / "work" / "scratch").mkdir(parents=True)
    helper_mount(repo, mnt, "overlay=scratch", tmp_path / "work")
    path = os.path.join(mnt, VDI, "latest.raw")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"written through the overlay", 3 * BLOCK + 5)
        assert os.pread(fd, 27, 3 * BLOCK + 5) == b"written through the overlay"
    finally:
        os.close(fd)
    run("umount", mnt)
    with Mount(repo, mnt) as m:  # the point is untouched
        assert files_equal(m.path(VDI, "latest.raw"), img)
    # a directory that does not exist is refused before mounting
    p = run(CBTFS, repo, mnt, "-o", "overlay=no-such-dir", check=False, cwd=tmp_path)
    assert p.returncode == 2 and "overlay=no-such-dir" in p.stderr, p.stderr
    assert not os.path.ismount(mnt)


# 10
def test_the_ram_overlay_is_bounded(tmp_path, repo, mnt):
    import_image(repo, image(tmp_path / "a.img", 64, 7), VDI, "2026-11-20T03:00:00Z")
    with Mount(repo, mnt, "-o", "overlay,overlay_max=1M") as m:
        fd = os.open(m.path(VDI, "latest.raw"), os.O_RDWR)
        try:
            for i in range(16):  # 1 MiB fits
                os.pwrite(fd, b"\x01" * BLOCK, i * BLOCK)
            os.pwrite(fd, b"\x02" * BLOCK, 0)  # rewriting takes no more room
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"\x03" * BLOCK, 16 * BLOCK)
            assert e.value.errno == errno.ENOSPC
            assert os.pread(fd, BLOCK, 0) == b"\x02" * BLOCK
        finally:
            os.close(fd)
    assert "overlay_max" in m.log and "overlay is full" in m.log, m.log
    for bad in ("overlay_max=lots", "overlay_max=0"):
        p = run(CBTFS, repo, mnt, "-o", bad, check=False)
        assert p.returncode == 2 and "overlay_max" in p.stderr, p.stderr


# 11
def test_an_unprivileged_mount_failure_gives_a_hint(tmp_path, shared_dir):
    repo = os.path.join(shared_dir, "repo")
    repo_tool("init", repo)
    smnt = os.path.join(shared_dir, "mnt")
    os.mkdir(smnt)
    for d in (repo, smnt):
        run("chown", "-R", "65534:65534", d)
    st = os.stat("/dev/fuse")
    p = run(*NOBODY, CBTFS, repo, smnt, check=False)
    if st.st_mode & 0o006 == 0o006:
        # /dev/fuse open to all: fusermount3 mounts for the owner of the mount point
        unmount_all(smnt)
        pytest.skip("/dev/fuse is open to every user here; nothing to refuse")
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "hint:" in p.stderr and "may not open /dev/fuse" in p.stderr and "'fuse'" in p.stderr, p.stderr
    assert mounts_at(smnt) == 0


# 12
def xxh3_collision():
    """Two different 64 KiB blocks with the same XXH3-64 (see the unit test
    of the same name): lane 0 of stripes 0 and 1 with their low halves equal
    to the secret's add no product, so 2^32 can move from one to the other."""
    secret = bytes([0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c])
    s0, s1 = int.from_bytes(secret[:8], "little"), int.from_bytes(secret[8:], "little")
    a = bytearray(random.Random(77).randbytes(BLOCK))
    a[0:8] = ((0x1234 << 32) | (s0 & 0xFFFFFFFF)).to_bytes(8, "little")
    a[64:72] = ((0x5678 << 32) | (s1 & 0xFFFFFFFF)).to_bytes(8, "little")
    b = bytearray(a)
    b[0:8] = ((0x1235 << 32) | (s0 & 0xFFFFFFFF)).to_bytes(8, "little")
    b[64:72] = ((0x5677 << 32) | (s1 & 0xFFFFFFFF)).to_bytes(8, "little")
    return bytes(a), bytes(b)


def test_a_block_crafted_to_collide_is_backed_up(tmp_path, repo, mnt):
    a, b = xxh3_collision()
    img = image(tmp_path / "disk.img", 16, 8)
    with open(img, "r+b") as f:
        f.seek(5 * BLOCK)
        f.write(a)
    import_image(repo, img, VDI, "2026-11-20T03:00:00Z")
    with open(img, "r+b") as f:  # the guest writes the colliding block
        f.seek(5 * BLOCK)
        f.write(b)
    p = repo_tool("import", "--vdi", VDI, "--time", "2026-11-21T03:00:00Z", repo, img)
    assert " 1 blocks stored" in p.stdout, p.stdout
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(VDI, "latest.raw"), img)
