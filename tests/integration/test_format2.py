"""Format 2 through the real commands: VMs cloned from one template and
backed up from the simulated XenServer store the template once, and every
point of every clone reads back byte for byte through the mount."""

import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import (BACKEND, REPO_TOOL, Mount, after_kill, files_equal, import_image, list_objects, ls_json,
                      new_repo_location, repo_tool, run, unfinished_uploads)
from test_ingest import MIB, ingest
from xapi import Sim

CLONES = 20
DISK = 16 * MIB
TEMPLATE_DATA = 8 * MIB  # the rest of the disk is never written


def store_bytes(repo):
    """Bytes of every pack of the shared store (local repositories)."""
    total = 0
    for root, _, files in os.walk(os.path.join(str(repo), "store", "packs")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".pack"))
    return total


@pytest.fixture
def repo2(tmp_path):
    r = new_repo_location(tmp_path, "repo2")
    repo_tool("init", "--format", "2", r)
    return r


@pytest.fixture
def clones(tmp_path):
    vms = [{"name": f"clone{i:02d}", "disks": [{"name": "system", "size": DISK}]} for i in range(CLONES)]
    sim = Sim(tmp_path, vms)
    template = random.Random(7).randbytes(TEMPLATE_DATA)
    rnd = random.Random(8)
    for i in range(CLONES):
        (disk,) = sim.disks_of(f"clone{i:02d}")
        with open(disk["path"], "r+b") as f:
            f.write(template)
            # 2 % of the disk unique to this clone: its own writes, scattered
            for _ in range(DISK // 65536 // 50):
                f.seek(rnd.randrange(DISK // 4096) * 4096)
                f.write(rnd.randbytes(4096))
    yield sim
    sim.stop()


@pytest.mark.skipif(BACKEND != "local", reason="measures the local store's files")
def test_twenty_clones_store_the_template_once(clones, repo2, tmp_path):
    vm_args = [a for i in range(CLONES) for a in ("--vm", f"clone{i:02d}")]
    # Four first backups at once read the same template blocks at about the
    # same moment: each block must still be stored once (a job waits for
    # the record another is compressing).
    ingest(clones, repo2, "-q", "--jobs", "4", *vm_args)
    stored = store_bytes(repo2)
    print(f"{CLONES} clones, 4 jobs: {stored} bytes stored")
    # One clone alone would store about TEMPLATE_DATA + its own writes.
    assert stored <= 1.6 * (TEMPLATE_DATA + DISK // 50), f"{stored} bytes for {CLONES} clones"

    # A second round of guest writes: each clone's incremental point.
    rnd = random.Random(9)
    for i in range(CLONES):
        clones.write(clones.disks_of(f"clone{i:02d}")[0]["uuid"], rnd.randrange(DISK // 65536) * 65536,
                     rnd.randbytes(65536))
    expect = {}
    for i in range(CLONES):
        (disk,) = clones.disks_of(f"clone{i:02d}")
        p = tmp_path / f"{disk['uuid']}.img"
        with open(disk["path"], "rb") as src, open(p, "wb") as dst:
            dst.write(src.read())
        expect[disk["uuid"]] = str(p)
    ingest(clones, repo2, "-q", *vm_args)
    assert store_bytes(repo2) - stored <= CLONES * 2 * 65536 + CLONES * 2 * 48 * 1024  # a block and its leaf, each

    mnt = tmp_path / "mnt"
    with Mount(repo2, mnt) as m:
        for uuid, img in expect.items():
            assert files_equal(m.path(uuid, "latest.raw"), img), uuid
    assert "verify OK" in repo_tool("verify", repo2).stdout


def test_imports_of_one_image_into_two_vdis_share_their_blocks(repo2, tmp_path, mnt):
    img = tmp_path / "disk.img"
    data = random.Random(1).randbytes(4 * MIB)
    img.write_bytes(data)
    a, b = "0b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01", "1b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a02"
    import_image(repo2, img, a, "2026-11-24T030000Z")
    import_image(repo2, img, b, "2026-11-24T030000Z")
    vdis = {v["uuid"]: v for v in ls_json(repo2)["vdis"]}
    assert vdis[a]["points"][0]["blocks_written"] == 64
    assert vdis[b]["points"][0]["blocks_written"] == 0
    assert "format      cbtfs v2" in repo_tool("info", repo2).stdout
    with Mount(repo2, mnt) as m:
        assert files_equal(m.path(a, "latest.raw"), img)
        assert files_equal(m.path(b, "latest.raw"), img)


def test_prune_on_format_2_collects_the_store(repo2, tmp_path):
    img = tmp_path / "disk.img"
    vdi = "0b0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01"
    rnd = random.Random(2)
    img.write_bytes(rnd.randbytes(2 * MIB))
    for h in range(3):
        with open(img, "r+b") as f:
            f.write(rnd.randbytes(65536))
        import_image(repo2, img, vdi, f"2026-11-24T0{h}0000Z")
    out = repo_tool("prune", "--keep-last", "1", repo2).stdout
    assert "removed 2 point(s)" in out
    m = re.search(r"store: (\d+) pack\(s\), (\d+) removed, ([\d.]+ \w+) freed", out)
    assert m, out
    assert m[3] != "0 B", out
    again = repo_tool("gc", repo2).stdout
    assert "0 B freed" in again, again
    restored = tmp_path / "back.img"
    repo_tool("restore", repo2, vdi, "latest", restored)
    assert files_equal(restored, img)


@pytest.mark.skipif(BACKEND != "local", reason="measures the local store's files")
def test_each_kind_of_chain_break_stores_only_what_differs(tmp_path, repo2):
    """CBT disabled (a storage migration), the host's CBT metadata lost
    (VDI_NO_CBT_METADATA) and a resize each start a new chain and read the
    whole disk; the store keeps only the blocks it did not have."""
    size = 24 * MIB
    sim = Sim(tmp_path, [{"name": "vm", "disks": [{"name": "system", "size": size}]}])
    try:
        (disk,) = sim.disks_of("vm")
        uuid = disk["uuid"]
        rnd = random.Random(11)
        sim.write(uuid, 0, rnd.randbytes(12 * MIB))
        ingest(sim, repo2, "-q", "--vm", "vm")
        images = {}

        def changed_then_backed_up(kind):
            # 4 blocks of guest writes before each break
            for _ in range(4):
                sim.write(uuid, rnd.randrange(12 * MIB // 65536) * 65536, rnd.randbytes(65536))
            before = store_bytes(repo2)
            ingest(sim, repo2, "-q", "--vm", "vm")
            latest = ls_json(repo2)["vdis"][0]["points"][-1]
            assert latest["full"], (kind, latest)
            p = tmp_path / f"{kind}.img"
            p.write_bytes(open(sim.vdi(uuid)["path"], "rb").read())
            images[latest["path"]] = p
            return store_bytes(repo2) - before, latest["chain_reason"]

        index = 4 * 48 * 1024  # new leaves and root of the new chain's index, at most
        sim.post("/disable_cbt", {"vdi": uuid})
        grown, why = changed_then_backed_up("cbt-disabled")
        assert grown <= 4 * 65536 + index, (grown, why)

        sim.post("/fail", {"method": "VDI.list_changed_blocks", "error": ["VDI_NO_CBT_METADATA", "OpaqueRef:x"]})
        grown, why = changed_then_backed_up("no-cbt-metadata")
        assert grown <= 4 * 65536 + index, (grown, why)

        sim.post("/resize", {"vdi": uuid, "size": size + 8 * MIB})
        sim.write(uuid, size, rnd.randbytes(2 * MIB))  # the new area gets data
        grown, why = changed_then_backed_up("resize")
        assert "virtual size changed" in why
        assert grown <= 4 * 65536 + 2 * MIB + index, (grown, why)

        with Mount(repo2, tmp_path / "mnt") as m:
            for path, img in images.items():
                assert files_equal(m.path(path), img), path
    finally:
        sim.stop()


def test_a_collection_killed_at_many_moments_frees_no_live_block(tmp_path, repo2):
    """prune (and its collection) killed with -9 at moments spread over its
    run, while another VDI is imported and a mount reads a third: every
    point left is byte-identical, verify is clean, and a collection run to
    the end afterwards keeps them so."""
    rnd = random.Random(12)
    A, B, C = ("0d0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a0" + c for c in "abc")
    # The kill moments repeat after 7 rounds (k % 7 below); S3 runs each
    # once, as each kill there costs a lock lease to run out.
    ROUNDS = 7 if BACKEND == "s3" else 12
    expect = {}  # (vdi, time as ls prints it) -> bytes

    def point(vdi, data, k):
        p = tmp_path / f"{vdi}-{k}.img"
        p.write_bytes(data)
        import_image(repo2, p, vdi, f"2026-11-{1 + k // 24:02d}T{k % 24:02d}0000Z")
        expect[(vdi, f"2026-11-{1 + k // 24:02d}T{k % 24:02d}:00:00Z")] = bytes(data)

    def changed(data, n):
        data = bytearray(data)
        for _ in range(n):
            b = rnd.randrange(len(data) // 65536)
            data[b * 65536:(b + 1) * 65536] = rnd.randbytes(65536)
        return data

    a = bytearray(rnd.randbytes(4 * MIB))
    point(A, a, 0)
    b = changed(a, 4)  # a clone of A's first point: shares most of its blocks
    point(B, b, 0)
    c = bytearray(rnd.randbytes(2 * MIB))
    point(C, c, 0)
    t = time.monotonic()
    repo_tool("gc", "-n", repo2)
    span = max(0.05, time.monotonic() - t)

    stop = threading.Event()
    errors = []
    b_image = tmp_path / "b.img"
    b_image.write_bytes(b)
    with Mount(repo2, tmp_path / "mnt") as m:
        def read_b():
            while not stop.is_set():
                if not files_equal(m.path(B, "2026-11-01T000000Z.raw"), b_image):
                    errors.append("B's point read differently")
        reader = threading.Thread(target=read_b)
        reader.start()
        try:
            for k in range(1, ROUNDS + 1):
                a = changed(a, 6)
                point(A, a, k)
                c = changed(c, 3)
                c_img = tmp_path / f"c-{k}.img"
                c_img.write_bytes(c)
                # another VDI's backup runs meanwhile, and must land whole
                imp = subprocess.Popen([REPO_TOOL, "import", "-q", "--vdi", C, "--time",
                                        f"2026-11-01T{k:02d}0000Z", str(repo2), str(c_img)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                pr = subprocess.Popen([REPO_TOOL, "prune", "--keep-last", "2", str(repo2), A],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                time.sleep(span * (k % 7) / 5)
                pr.send_signal(signal.SIGKILL)
                pr.wait()
                _, err = imp.communicate(timeout=60)
                assert imp.returncode == 0, err
                expect[(C, f"2026-11-01T{k:02d}:00:00Z")] = bytes(c)
                after_kill()
        finally:
            stop.set()
            reader.join()
    assert not errors, errors[:3]

    def check():
        listed = {(v["uuid"], p["time"]): p["path"] for v in ls_json(repo2)["vdis"] for p in v["points"]}
        assert set(listed) <= set(expect)
        assert (B, "2026-11-01T00:00:00Z") in listed and len([k for k in listed if k[0] == C]) == ROUNDS + 1
        want = tmp_path / "want.img"
        with Mount(repo2, tmp_path / "mnt2") as m2:
            for key, path in listed.items():
                want.write_bytes(expect[key])
                assert files_equal(m2.path(path), want), key
        assert "verify OK" in repo_tool("verify", repo2).stdout

    check()
    out = repo_tool("prune", "--keep-last", "2", repo2, A).stdout  # to the end this time
    check()
    if BACKEND == "s3":
        # A's first pack, which B still needs a few blocks of, was rewritten
        # without A's dead records while B was being read.
        files = [n for d in list_objects(repo2, "store/packs") for n in list_objects(repo2, "store/packs/" + d)]
        assert any(re.fullmatch(r"[0-9a-f]{16}-\d+\.pack", n) for n in files), (files, out)
    assert len([1 for v in ls_json(repo2)["vdis"] if v["uuid"] == A for p in v["points"]]) == 2


def half_written(repo):
    """The store's packs being written, or left half-written: temporary
    files beside the packs, or open multipart uploads on S3."""
    if BACKEND == "s3":
        return sorted(u["Key"].rsplit("/", 1)[-1] for u in unfinished_uploads(repo))
    root = os.path.join(str(repo), "store", "packs")
    return sorted(f.split(".")[2] + ".pack" for _, _, files in os.walk(root) for f in files if f.startswith(".tmp."))


def start_stalled_import(repo, vdi, blocks, fed, env):
    """An import from a pipe that got `fed` of its `blocks` and waits for
    the rest, once its pack is being written; (process, its data)."""
    data = random.Random(vdi).randbytes(blocks * 65536)
    p = subprocess.Popen([REPO_TOOL, "import", "-q", "--vdi", vdi, "--size", str(len(data)), str(repo), "/dev/stdin"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    before = half_written(repo)
    p.stdin.write(data[:fed * 65536])
    p.stdin.flush()
    deadline = time.monotonic() + 30
    while half_written(repo) == before:
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(p.communicate()[1])
        time.sleep(0.05)
    return p, data


def test_a_collection_drops_what_dead_backups_left_half_written_and_not_a_running_ones(tmp_path, repo2):
    """A backup killed in the middle of a pack leaves it half-written (a
    temporary file, or an open multipart upload on S3, which costs space
    until it is aborted). The next collection drops it, and leaves alone
    the pack a running backup is writing, which then commits whole."""
    dead, live = "0e0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a0" + "1", "0e0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a0" + "2"
    env = dict(os.environ, CBTFS_S3_PART_SIZE=str(5 * MIB))  # parts go up while the pack is written
    killed, _ = start_stalled_import(repo2, dead, 256, 160, env)
    killed.kill()
    killed.wait()
    after_kill()
    left = half_written(repo2)
    assert len(left) == 1, left
    running, data = start_stalled_import(repo2, live, 256, 160, env)
    theirs = sorted(set(half_written(repo2)) - set(left))
    assert len(theirs) == 1, (left, theirs)

    out = repo_tool("gc", repo2).stdout
    assert "1 unfinished file(s) of backups that died removed" in out, out
    assert half_written(repo2) == theirs

    running.stdin.write(data[160 * 65536:])
    running.stdin.close()
    assert running.wait(timeout=60) == 0, running.stderr.read()
    assert half_written(repo2) == []
    assert "verify OK" in repo_tool("verify", repo2).stdout
    img = tmp_path / "live.img"
    img.write_bytes(data)
    back = tmp_path / "back.img"
    repo_tool("restore", repo2, live, "latest", back)
    assert files_equal(back, img)


def test_a_collection_under_a_mounted_guest_file_system_keeps_every_file(tmp_path, repo2):
    """A guest's ext4 after a week: files deleted and trimmed (its blocks
    die with the oldest point), others written. The oldest point is pruned
    while the newest is mounted (loop device on the FUSE image, file system
    mounted from it) and the collection frees the dead blocks: punched out
    of packs locally, packs rewritten without them on S3. Every file still
    reads back, page cache dropped, e2fsck finds the file system clean,
    verify too."""
    import hashlib
    from disk import PART_START, Disk, sh

    vdi = "0d0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a77"
    rnd = random.Random(21)
    disk = Disk(tmp_path / "guest.img", 64 * MIB)
    files = {}

    def write(fs, name):
        data = rnd.randbytes(MIB)
        with open(os.path.join(fs, name), "wb") as f:
            f.write(data)
        files[name] = hashlib.sha256(data).hexdigest()

    with disk.mount_fs() as fs:
        for i in range(24):
            write(fs, f"old{i:02d}")
    import_image(repo2, disk.path, vdi, "2026-11-01T000000Z")
    with disk.mount_fs() as fs:
        for i in range(12):
            os.unlink(os.path.join(fs, f"old{i:02d}"))
            del files[f"old{i:02d}"]
        # As a guest's weekly trim: the deleted files' blocks read as zeros
        # now. Their blocks are free only once the journal has committed.
        sh("sync", "-f", fs)
        sh("fstrim", fs)
        for i in range(6):
            write(fs, f"new{i:02d}")
    import_image(repo2, disk.path, vdi, "2026-11-02T000000Z")
    with disk.mount_fs() as fs:
        write(fs, "last")
    import_image(repo2, disk.path, vdi, "2026-11-03T000000Z")

    fsdir = tmp_path / "guestfs"
    fsdir.mkdir()
    with Mount(repo2, tmp_path / "mnt") as m:
        loop = run("losetup", "-r", "-f", "--show", "-o", PART_START, m.path(vdi, "2026-11-03T000000Z.raw")).stdout.strip()
        try:
            run("mount", "-o", "ro", loop, fsdir)
            try:
                before = {n: hashlib.sha256(open(fsdir / n, "rb").read()).hexdigest() for n in files}
                assert before == files
                out = repo_tool("prune", "--keep-last", "2", repo2, vdi).stdout
                assert "removed 1 point(s)" in out, out
                freed = re.search(r"store: (\d+) pack\(s\), (\d+) removed, ([\d.]+ \w+) freed", out)
                assert freed and freed[3] != "0 B", out
                if BACKEND == "s3":
                    packs = [n for d in list_objects(repo2, "store/packs") for n in list_objects(repo2, "store/packs/" + d)]
                    assert any(re.fullmatch(r"[0-9a-f]{16}-\d+\.pack", n) for n in packs), (packs, out)
                run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")  # read from the repository again
                after = {n: hashlib.sha256(open(fsdir / n, "rb").read()).hexdigest() for n in files}
                assert after == files
            finally:
                run("umount", fsdir)
            fsck = run("e2fsck", "-fn", loop, check=False)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        finally:
            run("losetup", "-d", loop)
    assert "verify OK" in repo_tool("verify", repo2).stdout
    assert [p["time"] for v in ls_json(repo2)["vdis"] for p in v["points"]] == [
        "2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z"]
