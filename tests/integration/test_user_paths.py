"""The paths users walk every day, each through the kernel: images larger
than 4 GiB read with the standard tools, the daemonized mount that fstab and
mount(8) start, and mounts that stay up while the repository changes."""

import errno
import glob
import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import BACKEND, BLOCK, CBTFS, REPO_TOOL, Mount, files_equal, import_image, repo_tool, run, write_at

GiB = 1 << 30
VDI = "0b5c2f1e-7a3d-4e5f-9a9b-1c2d3e4f5a6b"


class HelperMount:
    """mount -t fuse.cbtfs: mount(8) -> mount.fuse3 -> cbtfs, which daemonizes
    (no -f), as an fstab line does. The built binary is linked into
    /usr/local/bin, the PATH mount.fuse3 searches."""

    LINK = "/usr/local/bin/cbtfs"

    def __init__(self, repo, mnt, opts=""):
        if os.path.exists(self.LINK) and os.path.realpath(self.LINK) != os.path.realpath(CBTFS):
            pytest.skip(f"{self.LINK} is another cbtfs; not replacing it")
        self.made = not os.path.lexists(self.LINK)
        if self.made:
            os.symlink(CBTFS, self.LINK)
        self.mnt = str(mnt)
        args = ["mount", "-t", "fuse.cbtfs"] + (["-o", opts] if opts else []) + [str(repo), self.mnt]
        p = run(*args, check=False)
        if p.returncode != 0:
            self._unlink()
            raise AssertionError(f"mount failed ({p.returncode}): {p.stderr}")
        assert os.path.ismount(self.mnt)

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def _unlink(self):
        if self.made and os.path.islink(self.LINK):
            os.unlink(self.LINK)
            self.made = False

    def unmount(self):
        if os.path.ismount(self.mnt):
            run("umount", self.mnt)
        self._unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and os.path.ismount(self.mnt):
            run("umount", "-l", self.mnt, check=False)
        self.unmount()


def sparse_image(path, size, extents, seed=1):
    """A sparse file of size bytes holding random data at each (offset, length)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
    for off, length in extents:
        write_at(path, off, rnd.randbytes(length))
    return str(path)


# Data below 2 GiB, between 2 and 4 GiB and above 4 GiB, with holes between.
BIG_SIZE = 6 * GiB + 3 * BLOCK
BIG_EXTENTS = [(0, 4 * BLOCK), (3 * GiB + 5 * BLOCK, 2 * BLOCK), (5 * GiB, 3 * BLOCK), (6 * GiB, 3 * BLOCK)]


@pytest.fixture
def big(tmp_path, repo):
    img = sparse_image(tmp_path / "big.img", BIG_SIZE, BIG_EXTENTS)
    import_image(repo, img, VDI, "2026-11-20T03:00:00Z", vm="big vm", name="data disk")
    return img


def test_seek_data_and_hole_past_4_gib_on_the_daemonized_mount(big, repo, mnt):
    with HelperMount(repo, mnt) as m:
        fd = os.open(m.path(VDI, "2026-11-20T030000Z.raw"), os.O_RDONLY)
        try:
            found = []
            pos = 0
            while True:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    assert e.errno == errno.ENXIO
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                found.append((data, hole - data))
                pos = hole
            assert found == BIG_EXTENTS
            assert os.lseek(fd, 4 * GiB + 123, os.SEEK_HOLE) == 4 * GiB + 123
            assert os.lseek(fd, 4 * GiB, os.SEEK_DATA) == 5 * GiB
        finally:
            os.close(fd)


def test_st_blocks_counts_stored_data_so_plain_cp_and_du_stay_sparse(big, repo, mnt, tmp_path):
    stored = sum(length for _, length in BIG_EXTENTS)
    with HelperMount(repo, mnt) as m:
        img = m.path(VDI, "2026-11-20T030000Z.raw")
        assert os.stat(img).st_size == BIG_SIZE
        assert os.stat(img).st_blocks * 512 == stored
        du = int(run("du", "-B1", img).stdout.split()[0])
        assert du == stored
        # cp without --sparse decides from st_blocks whether to look for holes.
        copy = tmp_path / "copy.img"
        run("cp", img, copy)
        assert os.stat(copy).st_blocks * 512 <= stored + 1024 * 1024
        assert files_equal(copy, big)


def test_partition_st_blocks_and_attributes(tmp_path, repo, mnt):
    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    run("sgdisk", "-n", "1:2048:+16M", "-n", "2:0:+16M", img)
    start2 = 2048 * 512 + 16 * 1024 * 1024
    write_at(img, 2048 * 512 + 5 * BLOCK, os.urandom(2 * BLOCK))
    write_at(img, start2 + 7 * BLOCK, os.urandom(3 * BLOCK))
    import_image(repo, img, VDI, "2026-11-20T03:00:00Z")
    with Mount(repo, mnt) as m:
        p1 = m.path(VDI, "2026-11-20T030000Z-part1.raw")
        p2 = m.path(VDI, "2026-11-20T030000Z-part2.raw")
        assert os.stat(p1).st_blocks * 512 == 2 * BLOCK
        assert os.stat(p2).st_blocks * 512 == 3 * BLOCK
        assert os.getxattr(p1, "user.cbtfs.virtual_size").decode() == str(os.stat(p1).st_size)
        assert os.getxattr(p1, "user.cbtfs.disk_size").decode() == str(64 * 1024 * 1024)
        assert os.readlink(m.path(VDI, "latest-part2.raw")) == "2026-11-20T030000Z-part2.raw"
        assert files_equal(m.path(VDI, "latest-part2.raw"), p2)


def test_forget_and_new_backup_under_a_long_lived_mount(tmp_path, repo, mnt):
    old = [sparse_image(tmp_path / f"old{i}.img", 8 * 1024 * 1024, [(0, 8 * 1024 * 1024)], seed=i) for i in range(3)]
    for i, img in enumerate(old):
        import_image(repo, img, VDI, f"2026-11-2{i}T03:00:00Z")
    with HelperMount(repo, mnt) as m:
        # The mount reads every old point (its caches fill with them).
        for i, img in enumerate(old):
            assert files_equal(m.path(VDI, f"2026-11-2{i}T030000Z.raw"), img)
        repo_tool("forget", repo, VDI)
        time.sleep(1.1)  # the kernel's entry and attribute timeouts
        assert not os.path.exists(m.path(VDI))
        new = [sparse_image(tmp_path / f"new{i}.img", 8 * 1024 * 1024, [(0, 8 * 1024 * 1024)], seed=10 + i)
               for i in range(2)]
        for i, img in enumerate(new):
            import_image(repo, img, VDI, f"2026-11-2{5 + i}T03:00:00Z")
        time.sleep(1.1)  # the kernel's entry and attribute timeouts
        names = sorted(n for n in os.listdir(m.path(VDI)) if n != "latest.raw")
        assert names == ["2026-11-25T030000Z.raw", "2026-11-26T030000Z.raw"]
        for i, img in enumerate(new):
            assert files_equal(m.path(VDI, f"2026-11-2{5 + i}T030000Z.raw"), img)
        seqs = [p["seq"] for p in json.loads(repo_tool("ls", "--json", repo).stdout)["vdis"][0]["points"]]
        assert min(seqs) > 3, seqs  # numbers are never used twice in a VDI's life


def chain_of(tmp_path, repo, n, size=4 * 1024 * 1024):
    """n points of a VDI, each rewriting a few blocks; returns [(name, state file)]."""
    rnd = random.Random(5)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(rnd.randbytes(size))
    out = []
    for i in range(n):
        if i:
            for _ in range(4):
                write_at(img, rnd.randrange(size // BLOCK) * BLOCK, rnd.randbytes(BLOCK))
        state = tmp_path / f"state{i}.img"
        state.write_bytes(img.read_bytes())
        import_image(repo, state, VDI, f"2026-10-{1 + i:02d}T03:00:00Z")
        out.append((f"2026-10-{1 + i:02d}T030000Z.raw", str(state)))
    return out


def test_prune_keeps_a_point_that_is_loop_attached_until_it_is_released(tmp_path, repo, mnt):
    points = chain_of(tmp_path, repo, 4)
    oldest, oldest_state = points[0]
    with HelperMount(repo, mnt) as m:
        loop = run("losetup", "-r", "-f", "--show", m.path(VDI, oldest)).stdout.strip()
        try:
            out = repo_tool("prune", "--keep-last", "1", repo).stdout
            assert f"kept, in use: {VDI}/{oldest}" in out, out
            assert "removed 2 point(s)" in out, out
            run("sh", "-c", f"echo 3 > /proc/sys/vm/drop_caches")  # read it from the repository again
            assert files_equal(loop, oldest_state)
        finally:
            run("losetup", "-d", loop)
        time.sleep(0.5)  # the kernel releases the file after the loop device
        out = repo_tool("prune", "--keep-last", "1", repo).stdout
        assert f"removed {VDI}/{oldest}" in out and "in use" not in out, out
        time.sleep(1.1)
        assert sorted(os.listdir(m.path(VDI))) == [points[-1][0], "latest.raw"]
        assert files_equal(m.path(VDI, points[-1][0]), points[-1][1])
    assert repo_tool("verify", repo).returncode == 0


def test_restore_of_a_point_that_prune_removes_meanwhile(tmp_path, repo):
    """The nightly prune runs while a restore copies the oldest point: the
    restore completes and is right; the point goes at the next prune."""
    points = chain_of(tmp_path, repo, 3, size=64 * 1024 * 1024)
    oldest, oldest_state = points[0]
    dst = tmp_path / "restored.img"
    # A slow destination: a FIFO read slowly would block restore's pwrite,
    # so the restore is paused with SIGSTOP instead, once it has started.
    proc = subprocess.Popen([REPO_TOOL, "restore", str(repo), VDI, oldest, str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (dst.exists() and dst.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        out = repo_tool("prune", "--keep-last", "1", repo).stdout
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert files_equal(dst, oldest_state)
    if f"kept, in use: {VDI}/{oldest}" not in out:
        pytest.fail(f"prune did not see the restore: {out}")
    out = repo_tool("prune", "--keep-last", "1", repo).stdout
    assert f"removed {VDI}/{oldest}" in out, out


@pytest.mark.skipif(BACKEND != "local", reason="space of a local repository")
def test_prune_frees_space_while_mounted(tmp_path, repo, mnt):
    # Every point rewrites the whole disk: the older points' packs are
    # wholly dead once they go.
    points = []
    for i in range(4):
        img = sparse_image(tmp_path / f"full{i}.img", 4 * 1024 * 1024, [(0, 4 * 1024 * 1024)], seed=20 + i)
        import_image(repo, img, VDI, f"2026-10-{1 + i:02d}T03:00:00Z")
        points.append((f"2026-10-{1 + i:02d}T030000Z.raw", img))
    with Mount(repo, mnt) as m:
        for name, state in points:  # every pack gets opened by the daemon
            assert files_equal(m.path(VDI, name), state)
        out = repo_tool("prune", "--keep-last", "1", repo).stdout
        packs = glob.glob(os.path.join(str(repo), "vdis", VDI, "packs", "*.pack")) + \
            glob.glob(os.path.join(str(repo), "store", "packs", "*", "*.pack"))  # format 1, format 2
        assert len(packs) == 1, out
        time.sleep(1.1)
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        assert files_equal(m.path(VDI, points[-1][0]), points[-1][1])  # the daemon reads again
        fd_dir = f"/proc/{m.proc.pid}/fd"
        held = [os.readlink(os.path.join(fd_dir, f)) for f in os.listdir(fd_dir)]
        assert not [h for h in held if h.endswith("(deleted)")], held
