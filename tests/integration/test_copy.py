"""cbtfs-repo copy: points of one repository into another (local or S3, format
1 or 2), only what the destination lacks, each point committed on its own,
resumed after an interruption. Under CBTFS_TEST_BACKEND=s3 the middle
repository of the round trip is a bucket: local -> S3 -> local."""
import glob
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import (BACKEND, REPO_TOOL, Mount, after_kill, files_equal, flip_byte, import_image, list_objects,
                      ls_json, new_repo_location, object_bytes, repo_tool, run)

MIB = 1 << 20
BLOCK = 65536
A = "0c0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a0a"
B = "0c0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a0b"


def init(location, fmt):
    run(REPO_TOOL, "init", "--format", str(fmt), location)
    return location


def copy(src, dst, *args, check=True):
    return run(REPO_TOOL, "copy", *args, src, dst, check=check)


def points_of(repo, vdi):
    return [p for v in ls_json(repo)["vdis"] if v["uuid"] == vdi for p in v["points"]]


def store_bytes(root):
    return sum(os.path.getsize(p) for p in glob.glob(f"{root}/store/packs/*/*.pack"))


def history(tmp_path, src):
    """Points of two VDIs: A with an incremental point and a resize (a new
    chain), B with a point whose blocks became zero. Returns {(vdi, time):
    image} of every point."""
    rnd = random.Random(5)
    expect = {}
    a = tmp_path / "a.img"
    a.write_bytes(rnd.randbytes(6 * MIB) + bytes(2 * MIB))
    import_image(src, a, A, "2026-11-01T030000Z", vm="web", name="system")
    expect[(A, "2026-11-01T03:00:00Z")] = a.read_bytes()
    with open(a, "r+b") as f:
        for blk in (3, 40, 99):
            f.seek(blk * BLOCK)
            f.write(rnd.randbytes(BLOCK))
    import_image(src, a, A, "2026-11-02T030000Z", vm="web", name="system")
    expect[(A, "2026-11-02T03:00:00Z")] = a.read_bytes()
    with open(a, "ab") as f:  # resized: 8 -> 12 MiB
        f.write(rnd.randbytes(4 * MIB))
    import_image(src, a, A, "2026-11-03T030000Z", vm="web", name="system")
    expect[(A, "2026-11-03T03:00:00Z")] = a.read_bytes()
    b = tmp_path / "b.img"
    b.write_bytes(rnd.randbytes(4 * MIB))
    import_image(src, b, B, "2026-11-01T040000Z", vm="db", name="data")
    expect[(B, "2026-11-01T04:00:00Z")] = b.read_bytes()
    with open(b, "r+b") as f:
        f.seek(MIB)
        f.write(bytes(MIB))
    import_image(src, b, B, "2026-11-02T040000Z", vm="db", name="data")
    expect[(B, "2026-11-02T04:00:00Z")] = b.read_bytes()
    return expect


def check_points(repo, expect, tmp_path):
    listed = {(v["uuid"], p["time"]): p for v in ls_json(repo)["vdis"] for p in v["points"]}
    assert set(listed) == set(expect)
    want = tmp_path / "want.img"
    with Mount(repo, tmp_path / "mnt-check") as m:
        for (vdi, t), data in expect.items():
            want.write_bytes(data)
            assert files_equal(m.path(listed[(vdi, t)]["path"]), want), (vdi, t)
    assert "verify OK" in run(REPO_TOOL, "verify", repo).stdout


@pytest.mark.parametrize("src_format", [1, 2])
def test_round_trip_is_byte_identical_and_a_second_copy_does_nothing(tmp_path, src_format):
    src = init(tmp_path / "src", src_format)
    expect = history(tmp_path, src)
    mid = init(new_repo_location(tmp_path, "mid"), 2)
    back = init(tmp_path / "back", 2)
    out = copy(src, mid).stdout
    assert "5 point(s) copied" in out, out
    copy(mid, back)
    check_points(back, expect, tmp_path)
    check_points(mid, expect, tmp_path)
    # Names, chains and the reason of the resize's new chain come along.
    a_points = points_of(back, A)
    assert [p["full"] for p in a_points] == [True, False, True]
    assert "virtual size changed" in a_points[2]["chain_reason"]
    assert [v["vm_name"] for v in ls_json(back)["vdis"] if v["uuid"] == A] == ["web"]
    # Nothing new: nothing read, nothing stored.
    again = copy(src, mid).stdout
    assert "nothing to copy (3 point(s) there already)" in again and "0 point(s) copied" in again, again
    assert len(points_of(mid, A)) == 3


def test_an_incremental_point_reads_and_stores_only_its_changes(tmp_path):
    src = init(tmp_path / "src", 2)
    dst = init(tmp_path / "dst", 2)
    img = tmp_path / "a.img"
    rnd = random.Random(6)
    img.write_bytes(rnd.randbytes(16 * MIB))
    import_image(src, img, A, "2026-11-01T030000Z")
    copy(src, dst)
    before = store_bytes(dst)
    with open(img, "r+b") as f:
        for blk in (1, 100, 200):
            f.seek(blk * BLOCK)
            f.write(rnd.randbytes(BLOCK))
    import_image(src, img, A, "2026-11-02T030000Z")
    out = copy(src, dst).stdout
    assert "copied " + A + "/2026-11-02T030000Z: 192.0 KiB read" in out, out
    (first, second) = points_of(dst, A)
    assert second["blocks_written"] == 3 and not second["full"]
    grown = store_bytes(dst) - before
    # 3 blocks, plus the leaf and root nodes written anew (48 KiB each at most)
    assert grown <= 3 * BLOCK + 3 * 48 * 1024 + 4096, grown
    with Mount(dst, tmp_path / "mnt") as m:
        assert files_equal(m.path(second["path"]), img)


def test_a_format_1_repository_moves_to_format_2_and_stays_readable(tmp_path):
    old = init(tmp_path / "old", 1)
    expect = history(tmp_path, old)
    new = init(tmp_path / "new", 2)
    assert "would copy" in copy(old, new, "--dry-run").stdout
    assert ls_json(new)["vdis"] == []
    copy(old, new)
    check_points(new, expect, tmp_path)
    check_points(old, expect, tmp_path)  # the source is only read
    assert "format      cbtfs v2" in run(REPO_TOOL, "info", new).stdout


def test_an_interrupted_copy_resumes_and_stores_only_what_was_lost(tmp_path):
    """Killed once its first pack is committed (into a bucket under
    CBTFS_TEST_BACKEND=s3), then run again."""
    src = init(tmp_path / "src", 1)
    img = tmp_path / "big.img"
    with open(img, "wb") as f:  # 320 MiB of incompressible data: more than two full packs
        rnd = random.Random(7)
        for _ in range(320):
            f.write(rnd.randbytes(MIB))
    import_image(src, img, A, "2026-11-01T030000Z")
    dst = init(new_repo_location(tmp_path, "dst"), 2)
    p = subprocess.Popen([REPO_TOOL, "copy", "-q", src, dst], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    def segments():  # one per committed pack
        try:
            return [n for n in list_objects(dst, "store/index") if n.endswith(".idx")]
        except FileNotFoundError:
            return []

    while not segments():  # a first pack committed
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    after_kill()
    assert ls_json(dst)["vdis"] == [] or points_of(dst, A) == []  # the point was not committed
    kept = object_bytes(dst, "store/packs")
    assert kept >= 100 * MIB
    out = copy(src, dst).stdout
    stored = int(float(out.split(" read, ")[1].split(" MiB stored")[0]) * MIB)
    assert stored <= 320 * MIB - kept + 8 * MIB, out  # what was committed is not sent again
    with Mount(dst, tmp_path / "mnt") as m:
        assert files_equal(m.path(A, "latest.raw"), img)
    assert "verify OK" in run(REPO_TOOL, "verify", dst).stdout


def test_damage_in_the_source_stops_that_vdi_with_a_clear_error_and_keeps_the_rest(tmp_path):
    src = init(tmp_path / "src", 1)
    expect = history(tmp_path, src)
    # The pack of A's second point holds only its 3 changed blocks.
    pack = f"{src}/vdis/{A}/packs/" + sorted(os.listdir(f"{src}/vdis/{A}/packs"))[1]
    flip_byte(pack, 100)
    dst = init(tmp_path / "dst", 2)
    p = copy(src, dst, check=False)
    assert p.returncode == 1, p
    assert "damaged in SRC" in p.stderr and "2026-11-02T030000Z" in p.stderr, p.stderr
    assert [x["time"] for x in points_of(dst, A)] == ["2026-11-01T03:00:00Z"]
    assert len(points_of(dst, B)) == 2  # the other VDI is copied all the same
    del expect[(A, "2026-11-02T03:00:00Z")], expect[(A, "2026-11-03T03:00:00Z")]
    check_points(dst, expect, tmp_path)


def test_wrong_arguments_are_clear_errors(tmp_path):
    src = init(tmp_path / "src", 2)
    p = copy(src, tmp_path / "nowhere", check=False)
    assert p.returncode == 3 and "cbtfs-repo init --format 2" in p.stderr, p
    p = copy(src, src, check=False)
    assert p.returncode == 2 and "same repository" in p.stderr, p
    p = run(REPO_TOOL, "copy", src, init(tmp_path / "dst", 2), A, check=False)
    assert p.returncode == 2 and "no VDI" in p.stderr, p
