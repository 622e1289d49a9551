"""cbtfs-repo rollback --xapi against the XAPI simulator: the original VDI goes
back to a point with only the blocks that differ written (the repository's
diff between the point and the latest one, united with CBT's since the latest
point); the next ingest stays incremental and stores the point's bytes; a VDI
in use is refused; a broken CBT chain falls back to a full write and says so;
--dry-run writes nothing; --keep-undo leaves the snapshot taken before."""

import glob
import json
import random
import re
import shutil
import subprocess
import time

import pytest

from conftest import BLOCK, REPO_TOOL, after_kill, files_equal, ls_json, run
from test_ingest import ingest, no_data_snapshots_left
from xapi import Sim

MIB = 1 << 20
SIZE = 32 * MIB
NBLOCKS = SIZE // BLOCK
CHUNK_HEADER = 12
SINCE_POINT = [3, 4, 5, 200, 201, NBLOCKS - 1]  # blocks the latest point changed after POINT
SINCE_LATEST = [5, 9, 300, 301, 302]            # blocks the guest wrote after the latest point
UNION = sorted(set(SINCE_POINT) | set(SINCE_LATEST))


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path, [{"name": "web01", "disks": [{"name": "system", "size": SIZE}]}])
    yield s
    s.stop()


def vm_uuid(sim):
    return next(v["uuid"] for v in sim.state()["vms"] if v["name"] == "web01")


def power(sim, state):
    sim.post("/power_state", {"vm": vm_uuid(sim), "state": state})


def rollback(sim, repo, vdi, point, *extra, check=True):
    return run(REPO_TOOL, "rollback", "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file",
               sim.ca_file, *extra, repo, vdi, point, check=check)


def imports(sim):
    return sim.get("/imports")["imports"]


def point_times(repo):
    return [p["time"] for p in ls_json(repo)["vdis"][0]["points"]]


def restore_file(repo, vdi, point, dest):
    run(REPO_TOOL, "restore", repo, vdi, point, str(dest))
    return str(dest)


@pytest.fixture
def history(sim, repo, tmp_path):
    return make_history(sim, repo, tmp_path)


def make_history(sim, repo, tmp_path):
    """POINT (its image kept), a later point, then guest writes after it; the VM halted.
    Returns (disk, POINT's time, POINT's image)."""
    disk = sim.disks_of("web01")[0]
    uuid = disk["uuid"]
    rnd = random.Random(5)
    sim.write(uuid, 0, rnd.randbytes(24 * MIB))
    ingest(sim, repo, "--vdi", uuid)
    point_img = tmp_path / "point.img"
    shutil.copyfile(disk["path"], point_img)
    for b in SINCE_POINT:
        sim.write(uuid, b * BLOCK + 100, rnd.randbytes(5000))
    ingest(sim, repo, "--vdi", uuid)
    for b in SINCE_LATEST:
        sim.write(uuid, b * BLOCK + 7, rnd.randbytes(300))
    power(sim, "Halted")
    sim.post("/reset_counters", {})
    (first, _) = point_times(repo)
    assert not files_equal(disk["path"], point_img)
    return disk, first, str(point_img)


def test_rollback_writes_only_the_changed_blocks_and_the_next_ingest_stays_incremental(sim, repo, history, tmp_path):
    disk, point, point_img = history
    uuid = disk["uuid"]
    snapshots_before = {v["uuid"] for v in sim.snapshots_of(uuid)}
    p = rollback(sim, repo, uuid, point)
    assert files_equal(disk["path"], point_img)
    assert (f"repository diff {len(SINCE_POINT)} blocks, CBT diff {len(SINCE_LATEST)} blocks since the latest "
            f"point's snapshot, union {len(UNION)} blocks") in p.stdout, p.stdout
    (rec,) = imports(sim)
    assert rec["vdi"] == sim.xapi()[0].VDI.get_by_uuid(sim.xapi()[1], uuid)["Value"]
    assert (rec["chunked"], rec["outcome"], rec["data_bytes"]) == (True, "success", len(UNION) * BLOCK)
    assert rec["body_bytes"] == len(UNION) * BLOCK + CHUNK_HEADER * (rec["chunks"] + 1)
    assert rec["body_bytes"] < SIZE // 40
    # The snapshot taken before writing is gone; the latest point's metadata-only one stays.
    assert {v["uuid"] for v in sim.snapshots_of(uuid)} == snapshots_before
    no_data_snapshots_left(sim)

    # The next ingest: incremental, the blocks the rollback wrote, and its point is POINT's bytes.
    power(sim, "Running")
    out = json.loads(ingest(sim, repo, "--vdi", uuid, "--json").stdout)["vdis"][0]
    assert not out["full"], out
    assert out["blocks_read"] == len(UNION), out
    assert files_equal(restore_file(repo, uuid, "latest", tmp_path / "after.img"), point_img)
    # And the one after that reads only what the guest writes next.
    sim.write(uuid, 77 * BLOCK, b"z")
    out = json.loads(ingest(sim, repo, "--vdi", uuid, "--json").stdout)["vdis"][0]
    assert (out["full"], out["blocks_read"]) == (False, 1), out


def test_rollback_to_the_latest_point_writes_what_the_guest_changed(sim, repo, history, tmp_path):
    disk, _, _ = history
    uuid = disk["uuid"]
    latest_img = restore_file(repo, uuid, "latest", tmp_path / "latest.img")
    p = rollback(sim, repo, uuid, "latest")
    assert "repository diff 0 blocks, CBT diff 5 blocks" in p.stdout, p.stdout
    assert files_equal(disk["path"], latest_img)
    (rec,) = imports(sim)
    assert rec["data_bytes"] == len(SINCE_LATEST) * BLOCK


@pytest.mark.parametrize("state", ["Running", "Paused", "Suspended"])
def test_refused_while_the_vm_is_not_halted(sim, repo, history, state):
    disk, point, point_img = history
    power(sim, state)
    before = open(disk["path"], "rb").read()
    snaps = sim.snapshots_of(disk["uuid"])
    p = rollback(sim, repo, disk["uuid"], point, check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert f"which is {state}" in p.stderr and "shut the VM down" in p.stderr, p.stderr
    assert imports(sim) == []
    assert sim.snapshots_of(disk["uuid"]) == snaps
    assert open(disk["path"], "rb").read() == before
    power(sim, "Halted")
    rollback(sim, repo, disk["uuid"], point)
    assert files_equal(disk["path"], point_img)


def break_by_disabling_cbt(sim, uuid):
    sim.post("/disable_cbt", {"vdi": uuid})
    return "changed block tracking is disabled on the VDI"


def break_by_destroying_the_snapshot(sim, uuid):
    proxy, session = sim.xapi()
    (meta,) = [v for v in sim.snapshots_of(uuid) if v["type"] == "cbt_metadata"]
    ref = proxy.VDI.get_by_uuid(session, meta["uuid"])["Value"]
    assert proxy.VDI.destroy(session, ref)["Status"] == "Success"
    return f"the latest point's snapshot {meta['uuid']} is gone from the host"


def break_by_a_new_cbt_chain(sim, uuid):
    proxy, session = sim.xapi()
    ref = proxy.VDI.get_by_uuid(session, uuid)["Value"]
    assert proxy.VDI.disable_cbt(session, ref)["Status"] == "Success"
    assert proxy.VDI.enable_cbt(session, ref)["Status"] == "Success"
    return "the host cannot list the changed blocks (SR_BACKEND_FAILURE_460"


@pytest.mark.parametrize("breaker", [break_by_disabling_cbt, break_by_destroying_the_snapshot, break_by_a_new_cbt_chain])
def test_a_broken_cbt_chain_writes_everything_and_says_so(sim, repo, history, tmp_path, breaker):
    disk, point, point_img = history
    uuid = disk["uuid"]
    reason = breaker(sim, uuid)
    p = rollback(sim, repo, uuid, point)
    assert f"CBT chain broken ({reason}" in p.stdout, p.stdout
    assert "full write of every byte" in p.stdout, p.stdout
    assert files_equal(disk["path"], point_img)
    (rec,) = imports(sim)
    assert (rec["chunked"], rec["outcome"], rec["data_bytes"]) == (False, "success", SIZE)
    no_data_snapshots_left(sim)
    # The next ingest starts a new chain (or not: CBT saw every write), and stores POINT's bytes.
    power(sim, "Running")
    ingest(sim, repo, "--vdi", uuid)
    assert files_equal(restore_file(repo, uuid, "latest", tmp_path / "after.img"), point_img)


def test_dry_run_writes_nothing(sim, repo, history):
    disk, point, point_img = history
    uuid = disk["uuid"]
    before = open(disk["path"], "rb").read()
    state_before = [(v["uuid"], v["type"], v["name"]) for v in sim.vdis()]
    p = rollback(sim, repo, uuid, point, "--dry-run")
    assert (f"would write repository diff {len(SINCE_POINT)} blocks, CBT diff {len(SINCE_LATEST)} blocks since the "
            f"latest point's snapshot, union {len(UNION)} blocks: {len(UNION) * BLOCK // 1024}.0 KiB of 32.0 MiB") in p.stdout, \
        p.stdout
    assert imports(sim) == []
    assert open(disk["path"], "rb").read() == before
    assert [(v["uuid"], v["type"], v["name"]) for v in sim.vdis()] == state_before
    calls = sim.get("/calls")
    assert not any(m in calls for m in ("VDI.snapshot", "Async.VDI.snapshot", "task.create")), calls
    # Broken chain: the dry run says so too.
    sim.post("/disable_cbt", {"vdi": uuid})
    p = rollback(sim, repo, uuid, point, "-n")
    assert "would write CBT chain broken (changed block tracking is disabled on the VDI)" in p.stdout, p.stdout
    assert f"full write of every byte: {SIZE // MIB}.0 MiB" in p.stdout, p.stdout
    assert imports(sim) == []


def test_keep_undo_leaves_a_named_snapshot_of_the_disk_before(sim, repo, history, tmp_path):
    disk, point, point_img = history
    uuid = disk["uuid"]
    before = tmp_path / "before.img"
    shutil.copyfile(disk["path"], before)
    p = rollback(sim, repo, uuid, point, "--keep-undo")
    assert files_equal(disk["path"], point_img)
    m = re.search(r"^undo snapshot: (\S+) \('(cbtfs-rollback [^']*)'\)$", p.stdout, re.M)
    assert m, p.stdout
    undo = sim.vdi(m.group(1))
    assert undo["name"] == m.group(2) and f"before rollback to {point.replace(':', '')}" in undo["name"]
    assert (undo["is_a_snapshot"], undo["snapshot_of"], undo["type"]) == (True, uuid, "user")
    assert files_equal(undo["path"], str(before))
    # The ingest leaves it alone and stays incremental.
    power(sim, "Running")
    out = json.loads(ingest(sim, repo, "--vdi", uuid, "--json").stdout)["vdis"][0]
    assert (out["full"], out["blocks_read"]) == (False, len(UNION)), out
    assert sim.vdi(m.group(1))["type"] == "user"


def test_a_failed_write_keeps_the_snapshot_and_a_second_run_finishes(sim, repo, history):
    disk, point, point_img = history
    uuid = disk["uuid"]
    sim.post("/import_fail", {"after_bytes": 2 * BLOCK})
    p = rollback(sim, repo, uuid, point, check=False)
    assert p.returncode != 0
    assert "the rollback failed part way" in p.stderr, p.stderr
    undo = [v for v in sim.snapshots_of(uuid) if v["name"].startswith("cbtfs-rollback")]
    assert len(undo) == 1 and undo[0]["type"] == "user", undo
    assert not files_equal(disk["path"], point_img)
    rollback(sim, repo, uuid, point)
    assert files_equal(disk["path"], point_img)


def test_usage_errors(sim, repo, history):
    disk, point, _ = history
    p = rollback(sim, repo, "00000000-0000-4000-8000-000000000000", point, check=False)
    assert p.returncode in (2, 3), p.stderr
    p = rollback(sim, repo, disk["uuid"], "1999-01-01T000000Z", check=False)
    assert p.returncode == 2, p.stderr
    p = run(REPO_TOOL, "rollback", repo, disk["uuid"], point, check=False)
    assert p.returncode == 2 and "--xapi" in p.stderr, p.stderr


def test_a_rollback_killed_while_snapshotting_is_cleaned_up_by_the_next_run(sim, repo, history):
    """The snapshot is journaled as the ingest's is: a run killed before it is named leaves
    a journal, and the next run (a rollback here; an ingest would do the same) removes
    the snapshot the killed run's task took."""
    disk, point, point_img = history
    uuid = disk["uuid"]
    sim.post("/task_delay", {"method": "Async.VDI.snapshot", "seconds": 3, "count": 1})
    proc = subprocess.Popen([REPO_TOOL, "rollback", "--xapi", sim.url, "--password-file", sim.password_file,
                             "--ca-file", sim.ca_file, str(repo), uuid, point],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not any(t["name"] == "Async.VDI.snapshot" for t in sim.state()["tasks"]):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    after_kill()
    assert glob.glob(f"{repo}/**/*journal*", recursive=True), "no journal left"
    assert imports(sim) == []
    time.sleep(3.5)     # the task completes on the host: an unnamed snapshot with data
    assert [v for v in sim.snapshots_of(uuid) if v["type"] != "cbt_metadata"]
    p = rollback(sim, repo, uuid, point)
    assert "removing snapshot" in p.stderr and "taken by an interrupted run" in p.stderr, p.stderr
    assert files_equal(disk["path"], point_img)
    no_data_snapshots_left(sim)
    assert not glob.glob(f"{repo}/**/*journal*", recursive=True)


def test_an_encrypted_repository_rolls_back_the_same_way(sim, tmp_path, monkeypatch):
    """Backed up into an encrypted repository with a root-only key file (as a
    nightly job would), rolled back with it: the same blocks written, the
    VDI is POINT's bytes, and the next ingest stays incremental."""
    from conftest import keyfile_repo

    repo = keyfile_repo(tmp_path, monkeypatch)
    disk, point, point_img = make_history(sim, repo, tmp_path)
    uuid = disk["uuid"]
    p = rollback(sim, repo, uuid, point)
    assert files_equal(disk["path"], point_img)
    assert f"union {len(UNION)} blocks" in p.stdout, p.stdout
    (rec,) = imports(sim)
    assert (rec["outcome"], rec["data_bytes"]) == ("success", len(UNION) * BLOCK)
    power(sim, "Running")
    out = json.loads(ingest(sim, repo, "--vdi", uuid, "--json").stdout)["vdis"][0]
    assert (out["full"], out["blocks_read"]) == (False, len(UNION)), out
    assert files_equal(restore_file(repo, uuid, "latest", tmp_path / "after.img"), point_img)
