"""nbdkit-cbtfs-plugin: a point as an NBD export. Its bytes are the point's
(qemu-img compare, nbdcopy, against the source image and the mount), its
holes are the index's (nbdinfo --map, sparse copies), writes through the
cow filter never reach the repository, names that do not exist are clear
errors, a damaged block is EIO and never data, and prune keeps the point
while the export is up."""

import errno
import json
import os
import random
import re
import subprocess
import time

import pytest

from conftest import (BACKEND, BLOCK, BUILD, Mount, flip_object_byte, get_object, import_image, list_objects,
                      pack_of_point, repo_tool, run, write_at)

PLUGIN = os.path.abspath(os.path.join(BUILD, "src", "nbdkit-cbtfs-plugin.so"))
VDI = "4e5f6a7b-8c9d-4e0f-9a1b-2c3d4e5f6a7b"
GIB = 1 << 30

if not os.path.exists(PLUGIN):
    pytest.skip("nbdkit plugin not built (-Dnbdkit_plugin=disabled, or no nbdkit-plugin-dev)", allow_module_level=True)
import nbd  # noqa: E402  python3-libnbd: per-request reads, writes and errors


class Export:
    """nbdkit in the foreground on a Unix socket, stopped with SIGTERM."""

    def __init__(self, tmp_path, *args, filters=()):
        self.sock = str(tmp_path / f"nbd-{time.monotonic_ns()}.sock")
        cmd = ["nbdkit", "-f", "-U", self.sock]
        for f in filters:
            cmd += ["--filter", f]
        cmd += [PLUGIN, *[str(a) for a in args]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise AssertionError(f"nbdkit exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("nbdkit did not listen within 10 s")
            time.sleep(0.02)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.log = ""

    def connect(self):
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(self.uri)
        return h

    def stop(self):
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("nbdkit did not exit on SIGTERM")
        self.log = self.proc.stderr.read()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.stop()
        elif self.proc is not None:  # already failing: do not mask the error
            self.proc.kill()
            self.proc.wait()
            print(self.proc.stderr.read())


def nbdkit_fails(*args):
    """Runs nbdkit with the plugin and arguments that must not start; returns its stderr."""
    p = subprocess.run(["nbdkit", "-f", "-U", "-", PLUGIN, *[str(a) for a in args], "--run", "true"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, p.stderr
    return p.stderr


def sparse_image(path, size, data_ranges, seed):
    """A sparse file of size bytes holding random data in [(offset, length)]."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in data_ranges:
            f.seek(off)
            f.write(rnd.randbytes(length))
    return str(path)


def data_blocks(path):
    """The 64 KiB blocks of a file that are not all zeros."""
    out = set()
    with open(path, "rb") as f:
        off = 0
        while True:
            try:
                off = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(f.fileno(), off, os.SEEK_HOLE)
            f.seek(off - off % BLOCK)
            b = off // BLOCK
            while b * BLOCK < end:
                if f.read(BLOCK).strip(b"\0"):
                    out.add(b)
                b += 1
            off = b * BLOCK
    return out


def tree_digest(repo):
    """Every object of the repository with a hash of its bytes (S3: its ETag)."""
    import hashlib
    out = {}
    if BACKEND == "s3":
        import conftest
        bucket, key = conftest._s3_split(repo, "")
        for page in conftest._rgw.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out.update({o["Key"]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])})
        return out
    for root, _, files in os.walk(str(repo)):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, str(repo))] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def big(tmp_path, repo):
    """Two points of a 5 GiB VDI with data below and past 4 GiB and holes
    (all-zero blocks included) between; returns the images by point name."""
    size = 5 * GIB + 3 * BLOCK
    ranges = [(0, 2 * 1024 * 1024), (3 * BLOCK + 100, 5000), (GIB + 7 * BLOCK, 3 * BLOCK),
              (4 * GIB + 12345, 1024 * 1024), (size - BLOCK, BLOCK)]
    a = sparse_image(tmp_path / "a.img", size, ranges, 1)
    write_at(a, 20 * BLOCK, bytes(BLOCK))  # an all-zero block written as data: a hole in the index
    import_image(repo, a, VDI, "2026-11-24T03:00:00Z", vm="web01", name="root disk")
    b = tmp_path / "b.img"
    run("cp", "--sparse=always", a, b)
    write_at(b, 4 * GIB + 64 * BLOCK, b"changed past 4 GiB" * 100)
    write_at(b, 5 * BLOCK, b"changed" * 1000)
    import_image(repo, b, VDI, "2026-11-25T03:00:00Z", vm="web01", name="root disk")
    return {"2026-11-24T030000Z": a, "2026-11-25T030000Z": str(b)}


def test_export_is_the_point_byte_for_byte_and_copies_sparsely(tmp_path, repo, mnt, big):
    with Export(tmp_path, f"repo={repo}", "vdi=web01/root disk", "point=2026-11-24T030000Z") as e, \
            Mount(repo, mnt) as m:
        old = big["2026-11-24T030000Z"]
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, old)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, m.path(VDI, "2026-11-24T030000Z.raw"))
        # The older point, not the newer one: they differ at 5 * BLOCK and past 4 GiB.
        assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, big["2026-11-25T030000Z"],
                   check=False).returncode == 1
        out = tmp_path / "copy.img"
        run("nbdcopy", e.uri, out)
        assert run("cmp", out, old, check=False).returncode == 0
        assert os.path.getsize(out) == os.path.getsize(old) == 5 * GIB + 3 * BLOCK
        # Sparse: only what the index holds is written (about 3.3 MiB here).
        assert os.stat(out).st_blocks * 512 < 16 * 1024 * 1024, os.stat(out).st_blocks
        conv = tmp_path / "conv.img"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", e.uri, conv)
        assert run("cmp", conv, old, check=False).returncode == 0
        assert os.stat(conv).st_blocks * 512 < 16 * 1024 * 1024
        h = e.connect()
        assert h.is_read_only() and h.can_multi_conn() and h.can_cache()
        assert h.get_size() == os.path.getsize(old)
        h.cache(8 * 1024 * 1024, 4 * GIB)  # NBD_CMD_CACHE is served
        with pytest.raises(nbd.Error):  # no writes without a filter
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
    assert e.proc is None

    # Default point: the newest, by uuid as well as by VM/VDI.
    with Export(tmp_path, f"repo={repo}", f"vdi={VDI}") as e:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, big["2026-11-25T030000Z"])
        assert "root disk" in run("nbdinfo", e.uri).stdout  # the export's description names it


def test_map_shows_the_holes_of_the_index(tmp_path, repo, big):
    img = big["2026-11-25T030000Z"]
    want = data_blocks(img)
    assert 20 not in want and 0 in want and (5 * GIB + 2 * BLOCK) // BLOCK in want
    with Export(tmp_path, f"repo={repo}", "vdi=web01/root disk", "point=latest") as e:
        extents = json.loads(run("nbdinfo", "--json", "--map", e.uri).stdout)
    got, pos = set(), 0
    for x in extents:
        assert x["offset"] == pos
        pos += x["length"]
        if x["type"] == 0:
            assert x["offset"] % BLOCK == 0 and x["length"] % BLOCK == 0, x
            got.update(range(x["offset"] // BLOCK, (x["offset"] + x["length"]) // BLOCK))
        else:
            assert x["type"] == 3, x  # hole and zero
    assert pos == os.path.getsize(img)
    assert got == want
    assert any(x["type"] == 3 and x["offset"] > 4 * GIB for x in extents)


def test_cow_filter_writes_never_reach_the_repository(tmp_path, repo, big):
    before = tree_digest(repo)
    old = big["2026-11-24T030000Z"]
    with Export(tmp_path, f"repo={repo}", f"vdi={VDI}", "point=2026-11-24T030000Z", filters=["cow"]) as e:
        h = e.connect()
        assert not h.is_read_only()
        h.pwrite(b"\xab" * BLOCK, 4 * GIB + 64 * BLOCK)
        h.pwrite(b"written" * 100, 100)
        h.pwrite(bytes(BLOCK), 0)  # (the cow filter offers no NBD_CMD_WRITE_ZEROES over a plugin without it)
        h.flush()
        assert h.pread(BLOCK, 4 * GIB + 64 * BLOCK) == b"\xab" * BLOCK
        assert h.pread(BLOCK, 0) == bytes(BLOCK)
        h.shutdown()
    assert tree_digest(repo) == before
    assert repo_tool("verify", repo).returncode == 0
    with Export(tmp_path, f"repo={repo}", f"vdi={VDI}", "point=2026-11-24T030000Z") as e:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, old)


def test_missing_repository_vdi_or_point_is_a_clear_error(tmp_path, repo, big):
    err = nbdkit_fails(f"repo={repo}", "vdi=web01/no such disk")
    assert "no VDI named web01/no such disk" in err, err
    err = nbdkit_fails(f"repo={repo}", "vdi=0e5f6a7b-8c9d-4e0f-9a1b-2c3d4e5f6a7b")
    assert "no VDI 0e5f6a7b-8c9d-4e0f-9a1b-2c3d4e5f6a7b in the repository" in err, err
    err = nbdkit_fails(f"repo={repo}", f"vdi={VDI}", "point=2026-11-23T030000Z")
    assert f"VDI {VDI} has no point 2026-11-23T030000Z" in err, err
    err = nbdkit_fails(f"repo={tmp_path / 'nowhere'}", f"vdi={VDI}")
    assert "cannot open repository" in err and "nowhere" in err, err
    err = nbdkit_fails(f"repo={repo}")
    assert "repo= and vdi= are required" in err, err
    err = nbdkit_fails(f"repo={repo}", f"vdi={VDI}", "pont=latest")
    assert "unknown parameter 'pont'" in err, err


def test_damaged_block_is_eio_never_data(tmp_path, repo):
    n = 64
    rnd = random.Random(3)
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        for b in range(n):
            f.write(bytes(BLOCK) if b % 5 == 0 else rnd.randbytes(BLOCK))
    import_image(repo, img, VDI, "2026-11-20T03:00:00Z")
    pack = pack_of_point(repo, VDI)
    size = len(get_object(repo, pack))
    for off in random.Random(7).sample(range(24, size - 60000), 3):  # data records; the index nodes are at the end
        flip_object_byte(repo, pack, off)
    v = repo_tool("verify", repo, check=False)
    bad = {int(b) for b in re.findall(r"block (\d+)", v.stdout)}
    assert v.returncode == 1 and 1 <= len(bad) <= 3, v.stdout

    want = open(img, "rb").read()
    with Export(tmp_path, f"repo={repo}", f"vdi={VDI}") as e:
        h = e.connect()
        for b in range(n):
            if b in bad:
                with pytest.raises(nbd.Error) as ex:
                    h.pread(BLOCK, b * BLOCK)
                assert ex.value.errnum == errno.EIO, b
                with pytest.raises(nbd.Error):  # part of the block, across its start
                    h.pread(4096, b * BLOCK - 2048 if b else 0)
            else:
                assert h.pread(BLOCK, b * BLOCK) == want[b * BLOCK:(b + 1) * BLOCK], f"block {b} wrong"
        h.shutdown()
        assert run("nbdcopy", e.uri, tmp_path / "out.img", check=False).returncode != 0
    assert "checksum mismatch" in e.log or "decompress" in e.log, e.log


def test_prune_keeps_the_exported_point_until_the_export_stops(tmp_path, repo):
    imgs = {}
    base = tmp_path / "p0.img"
    sparse_image(base, 64 * BLOCK, [(0, 64 * BLOCK)], 5)
    for i in range(4):
        img = tmp_path / f"p{i}.img"
        if i:
            run("cp", tmp_path / f"p{i - 1}.img", img)
            write_at(img, i * BLOCK, random.Random(i).randbytes(BLOCK))
        import_image(repo, img, VDI, f"2026-11-2{i}T03:00:00Z")
        imgs[f"2026-11-2{i}T030000Z"] = img
    oldest = "2026-11-20T030000Z"
    with Export(tmp_path, f"repo={repo}", f"vdi={VDI}", f"point={oldest}") as e:
        out = repo_tool("prune", "--keep-last", "1", repo).stdout
        assert f"kept, in use: {VDI}/{oldest}" in out, out
        assert "00000001.point" in list_objects(repo, f"vdis/{VDI}/points")
        # Still served, and still right, after prune.
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, imgs[oldest])
    out = repo_tool("prune", "--keep-last", "1", repo).stdout
    assert "in use" not in out, out
    assert list_objects(repo, f"vdis/{VDI}/points") == ["00000004.point"]
    err = nbdkit_fails(f"repo={repo}", f"vdi={VDI}", f"point={oldest}")
    assert f"has no point {oldest}" in err, err


def test_an_encrypted_repository_is_exported_with_its_key_and_refused_without(tmp_path, monkeypatch):
    """The key comes as for every other command (here a root-only key file
    named by CBTFS_KEY_FILE); without it nbdkit does not start, and says why."""
    from conftest import keyfile_repo, root_only_file

    repo = keyfile_repo(tmp_path, monkeypatch)
    img = sparse_image(tmp_path / "d.img", 5 * GIB, [(0, 4 * BLOCK), (4 * GIB + 5 * BLOCK, 3 * BLOCK)], 11)
    import_image(repo, img, VDI, "2026-11-30T03:00:00Z", vm="payroll", name="db")
    with Export(tmp_path, f"repo={repo}", "vdi=payroll/db") as e:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, img)
        h = e.connect()
        assert h.pread(3 * BLOCK, 4 * GIB + 5 * BLOCK) == _read_at(img, 4 * GIB + 5 * BLOCK, 3 * BLOCK)
        h.shutdown()

    monkeypatch.delenv("CBTFS_KEY_FILE")
    err = nbdkit_fails(f"repo={repo}", f"vdi={VDI}")
    assert "encrypted" in err and "key" in err, err
    wrong = root_only_file(tmp_path / "wrong.key", "x" * 40)
    monkeypatch.setenv("CBTFS_KEY_FILE", str(wrong))
    err = nbdkit_fails(f"repo={repo}", f"vdi={VDI}")
    assert "opens none of its key slots" in err, err


def _read_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
