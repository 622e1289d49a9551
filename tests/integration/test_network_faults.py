"""cbtfs-ingest under network faults, against the XAPI simulator: XAPI calls
that time out, lose their answer, get HTTP 500 or an answer that is not XML, a
session that expires in the middle of a run, NBD reads that fail for a while,
for good, or slowly. A read-only call or an NBD read is retried a bounded
number of times, a call that changes something is not repeated (cbtfs-ingest(1),
--xapi-timeout and FAILURES); then the run either succeeds, or fails cleanly:
exit status 1, a FAILED line naming the fault, no half point, no snapshot with
data left on the host, the previous metadata-only snapshot kept. The next run
then succeeds, is still a delta, and stores what the disk holds.

An untrusted XAPI certificate (exit status 4, a message about the certificate)
is tested in test_ingest.py; a dropped NBD connection too."""

import json
import os
import random
import subprocess
import time

import pytest

from conftest import BLOCK, Mount, files_equal, ls_json, repo_tool
from xapi import Sim

BUILD_SRC = os.path.join(os.environ.get("CBTFS_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build")), "src")
INGEST = os.path.abspath(os.path.join(BUILD_SRC, "cbtfs-ingest"))
MIB = 1 << 20
SIZE = 8 * MIB
TIMEOUT = 2                     # --xapi-timeout of the runs that meet a stalled call
BACKOFF = 1 + 2 + 4             # seconds between the 3 retries of a read-only XAPI call
NBD_BACKOFF = 0.5 + 1 + 2 + 4 + 8   # seconds between the 5 retries of an NBD read


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path, [{"name": "db01", "disks": [{"name": "db", "size": SIZE}]}])
    yield s
    s.stop()


@pytest.fixture
def disk(sim):
    d = sim.disks_of("db01")[0]
    sim.write(d["uuid"], 0, random.Random(1).randbytes(SIZE))
    return d


def ingest(sim, repo, disk, *args):
    """One run of the disk with --json: (process, summary or None, seconds)."""
    cmd = [INGEST, "--xapi", sim.url, "--user", "root", "--password-file", sim.password_file,
           "--ca-file", sim.ca_file, "--vdi", disk["uuid"], "--json", *map(str, args), str(repo)]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    try:
        summary = json.loads(p.stdout)
    except ValueError:
        summary = None
    return p, summary, seconds


def succeeds(sim, repo, disk, *args):
    p, summary, seconds = ingest(sim, repo, disk, *args)
    assert p.returncode == 0, p.stderr
    assert summary["ok"] and summary["vdis"][0]["ok"], summary
    return summary["vdis"][0], p.stderr, seconds


def backed_up(sim, repo, disk):
    """A first, full point, before any fault is armed."""
    out, _, _ = succeeds(sim, repo, disk)
    assert out["full"]
    sim.post("/reset_counters", {})


def change(sim, disk, seed):
    """Changes 3 blocks as the guest would; returns how many blocks changed."""
    rnd = random.Random(seed)
    for block in (2, 50, SIZE // BLOCK - 1):
        sim.write(disk["uuid"], block * BLOCK + rnd.randrange(BLOCK - 100), rnd.randbytes(100))
    return 3


def points(repo):
    vdis = ls_json(repo)["vdis"]
    return vdis[0]["points"] if vdis else []


def data_snapshots(sim):
    return [v for v in sim.vdis() if v["is_a_snapshot"] and v["type"] != "cbt_metadata"]


def calls(sim, method):
    return sim.get("/calls").get(method, 0)


def read_errors(sim, disk):
    """NBD reads of the disk or its snapshots that were answered with an error."""
    return sim.get(f"/nbd_bytes?vdi={disk['uuid']}")["read_errors"]


def fails_cleanly(sim, repo, disk, p, summary, before, *needles):
    """Exit 1, a FAILED line with each needle, no new point, a sound repository,
    no snapshot with data on the host, the latest point's snapshot kept."""
    assert p.returncode == 1, (p.returncode, p.stderr)
    failed = [line for line in p.stderr.splitlines() if "FAILED:" in line]
    assert len(failed) == 1 and disk["uuid"] in failed[0], p.stderr
    for needle in needles:
        assert needle in failed[0], (needle, p.stderr)
    assert summary is not None and not summary["ok"] and not summary["vdis"][0]["ok"], p.stdout
    assert points(repo) == before
    assert repo_tool("verify", repo).returncode == 0
    assert data_snapshots(sim) == []
    if before:
        kept = [v for v in sim.snapshots_of(disk["uuid"]) if v["type"] == "cbt_metadata"]
        assert [v["uuid"] for v in kept] == [before[-1]["snapshot_uuid"]], kept


def next_run_is_right(sim, repo, mnt, disk, changed):
    """The run after a fault: a delta of the latest point (its snapshot was
    kept), reading just the changed blocks, and equal to the disk."""
    count = len(points(repo))
    out, _, _ = succeeds(sim, repo, disk)
    assert not out["full"] and out["blocks_read"] == changed, out
    assert len(points(repo)) == count + 1
    assert data_snapshots(sim) == []
    snaps = sim.snapshots_of(disk["uuid"])
    assert [(v["uuid"], v["type"]) for v in snaps] == [(out["snapshot_uuid"], "cbt_metadata")], snaps
    assert sim.state()["sessions"] == 0         # logged out, also after logging in again
    stored_equals_disk(repo, mnt, disk)


def stored_equals_disk(repo, mnt, disk):
    assert repo_tool("verify", repo).returncode == 0
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(disk["uuid"], "latest.raw"), disk["path"])


# --- XAPI: a call that stalls past --xapi-timeout ----------------------------------------

def test_a_read_only_call_that_times_out_once_is_retried(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 2)
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "delay": TIMEOUT + 2, "count": 1})
    out, _, seconds = succeeds(sim, repo, disk, "--xapi-timeout", TIMEOUT)
    assert not out["full"] and out["blocks_read"] == changed, out
    assert calls(sim, "VDI.list_changed_blocks") == 2
    assert seconds >= TIMEOUT + 1                   # the timeout, then 1 s before the retry
    assert data_snapshots(sim) == []
    stored_equals_disk(repo, mnt, disk)


def test_a_read_only_call_that_keeps_timing_out_fails_cleanly(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 3)
    before = points(repo)
    delay = TIMEOUT + 1
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "delay": delay, "count": 4})
    p, summary, seconds = ingest(sim, repo, disk, "--xapi-timeout", TIMEOUT)
    # The call and its 3 retries, each abandoned after the timeout: bounded.
    assert calls(sim, "VDI.list_changed_blocks") == 4
    assert 4 * TIMEOUT + BACKOFF <= seconds < 4 * TIMEOUT + BACKOFF + 10, seconds
    time.sleep(delay)                               # the host is done with the abandoned calls
    fails_cleanly(sim, repo, disk, p, summary, before, "timed out")
    next_run_is_right(sim, repo, mnt, disk, changed)


def test_a_snapshot_that_times_out_is_not_repeated(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 4)
    before = points(repo)
    delay = TIMEOUT + 3
    sim.post("/fail", {"method": "Async.VDI.snapshot", "delay": delay, "count": 1})
    p, summary, seconds = ingest(sim, repo, disk, "--xapi-timeout", TIMEOUT)
    assert calls(sim, "Async.VDI.snapshot") == 1
    assert seconds < delay, seconds                 # gave up after the timeout, no retry
    # The host gets the abandoned call only after the run logged out: it
    # refuses it (SESSION_INVALID), so no snapshot is made behind our back.
    time.sleep(delay)
    fails_cleanly(sim, repo, disk, p, summary, before, "snapshot failed", "timed out")
    assert len(sim.snapshots_of(disk["uuid"])) == 1
    next_run_is_right(sim, repo, mnt, disk, changed)


def admin_snapshot(sim, disk):
    """What an admin does between two runs: xe vdi-snapshot ("before upgrade")."""
    proxy, session = sim.xapi()
    ref = proxy.VDI.get_by_uuid(session, disk["uuid"])["Value"]
    snap = proxy.VDI.snapshot(session, ref, {})["Value"]
    proxy.VDI.set_name_label(session, snap, "before upgrade")
    return proxy.VDI.get_uuid(session, snap)["Value"]


@pytest.mark.parametrize("fault", ["malformed", "no_answer"])
def test_a_lost_snapshot_answer_is_reported_and_an_admin_snapshot_survives(sim, repo, mnt, disk, fault):
    """The host made the snapshot, but the answer that names its task came
    garbled or not at all: the call is not repeated (a second snapshot would
    be made) and the VDI fails. An admin then takes a snapshot of their own.
    Nothing proves which of the two the failed run took, so the next run
    destroys neither: it names the candidates and the command to remove one,
    and backs up as usual."""
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 5)
    before = points(repo)
    sim.post("/fail", {"method": "Async.VDI.snapshot", fault: True, "count": 1})
    p, summary, _ = ingest(sim, repo, disk)
    # Resent, the call would make a second snapshot. (An HTTP client may
    # resend by itself a request that got no answer on a connection it reused.)
    assert calls(sim, "Async.VDI.snapshot") == 1, f"the snapshot was asked for again after its answer was lost:\n{p.stderr}"
    assert p.returncode == 1 and "snapshot failed: " in p.stderr, p.stderr
    assert points(repo) == before
    assert repo_tool("verify", repo).returncode == 0
    left = data_snapshots(sim)
    assert len(left) == 1 and left[0]["snapshot_of"] == disk["uuid"] and left[0]["name"] == "db", left
    mine = admin_snapshot(sim, disk)
    out, log, _ = succeeds(sim, repo, disk)
    assert not out["full"] and out["blocks_read"] == changed, out
    for uuid in (left[0]["uuid"], mine):
        assert sim.vdi(uuid)["type"] != "cbt_metadata"       # neither destroyed nor emptied
        assert f"remove it with: xe vdi-destroy uuid={uuid}" in log, log
    assert "removing snapshot" not in log, log
    stored_equals_disk(repo, mnt, disk)


def test_a_run_killed_while_its_snapshot_is_taken_and_an_admin_snapshot(sim, repo, mnt, disk):
    """The run is killed while the host takes its snapshot (the task is
    journaled); the snapshot completes; an admin takes one of their own. The
    next run reads the task's result back and removes exactly its own."""
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 6)
    sim.post("/task_delay", {"method": "Async.VDI.snapshot", "seconds": 2})
    cmd = [INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
           "--vdi", disk["uuid"], str(repo)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while calls(sim, "task.get_status") == 0:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    time.sleep(2.5)                                  # the host finishes the snapshot
    left = data_snapshots(sim)
    assert len(left) == 1, left
    mine = admin_snapshot(sim, disk)
    out, log, _ = succeeds(sim, repo, disk)
    assert f"removing snapshot {left[0]['uuid']}, taken by an interrupted run" in log, log
    assert left[0]["uuid"] not in {v["uuid"] for v in sim.vdis()}
    assert sim.vdi(mine)["type"] != "cbt_metadata" and mine not in log
    assert not out["full"] and out["blocks_read"] == changed, out
    stored_equals_disk(repo, mnt, disk)


def test_a_snapshot_slower_than_its_deadline(sim, repo, mnt, disk):
    """--snapshot-timeout: the run gives up on a snapshot the host is slow to
    take, cancels the task, and fails cleanly; the next run is right."""
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 7)
    before = points(repo)
    sim.post("/task_delay", {"method": "Async.VDI.snapshot", "seconds": 5})
    p, summary, seconds = ingest(sim, repo, disk, "--snapshot-timeout", 1)
    assert seconds < 5, seconds
    fails_cleanly(sim, repo, disk, p, summary, before, "did not finish the snapshot within 1 s")
    next_run_is_right(sim, repo, mnt, disk, changed)


def test_a_lost_answer_on_a_kept_alive_connection_is_not_resent(sim, repo, mnt, disk):
    """XAPI calls share one kept-alive connection. The host names the snapshot of
    a VM run, then closes that connection without answering: the HTTP client must
    not send the call again on a new connection by itself (it would, for a
    request whose body it may resend). The disk fails cleanly, and its snapshot
    goes."""
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 21)
    before = points(repo)
    sim.post("/fail", {"method": "VDI.set_name_label", "no_answer": True, "count": 1})
    p, summary, _ = ingest(sim, repo, disk, "--vm", "db01")
    assert calls(sim, "VDI.set_name_label") == 1, p.stderr
    assert calls(sim, "VDI.get_record") > 0       # the call was not the connection's first
    fails_cleanly(sim, repo, disk, p, summary, before, "cannot name the snapshot",
                  "the connection closed before the host answered")
    next_run_is_right(sim, repo, mnt, disk, changed)


def test_a_lost_data_destroy_answer_after_the_commit(sim, repo, mnt, disk):
    """The point is committed; the answer to making its snapshot metadata-only
    is lost. The point stays a success, and no snapshot with data stays."""
    backed_up(sim, repo, disk)
    change(sim, disk, 13)
    count = len(points(repo))
    sim.post("/fail", {"method": "VDI.data_destroy", "no_answer": True, "count": 1})
    out, log, _ = succeeds(sim, repo, disk)
    assert not out["full"] and len(points(repo)) == count + 1
    assert data_snapshots(sim) == []
    assert repo_tool("verify", repo).returncode == 0
    # Made metadata-only after all (the host did it) or destroyed, as the log says.
    snaps = sim.snapshots_of(disk["uuid"])
    if "destroyed it, so the next run is a full one" not in log:
        assert [(v["uuid"], v["type"]) for v in snaps] == [(out["snapshot_uuid"], "cbt_metadata")], (snaps, log)
    changed = change(sim, disk, 14)
    out, _, _ = succeeds(sim, repo, disk)
    if snaps:
        assert not out["full"] and out["blocks_read"] == changed, out
    else:
        assert out["full"] and "is gone from the host" in out["chain_reason"], out
    assert data_snapshots(sim) == []
    stored_equals_disk(repo, mnt, disk)


def test_a_login_that_times_out(sim, repo, mnt, disk):
    """Not retried: exit status 4, and nothing is touched."""
    delay = TIMEOUT + 2
    sim.post("/fail", {"method": "session.login_with_password", "delay": delay, "count": 1})
    p, _, seconds = ingest(sim, repo, disk, "--xapi-timeout", TIMEOUT)
    assert p.returncode == 4, p.stderr
    assert "cannot log in" in p.stderr and "timed out" in p.stderr, p.stderr
    assert seconds < delay and calls(sim, "session.login_with_password") == 1
    assert ls_json(repo)["vdis"] == []
    assert [v for v in sim.vdis() if v["is_a_snapshot"]] == []
    time.sleep(delay)                               # the host is done with the abandoned login
    out, _, _ = succeeds(sim, repo, disk)
    assert out["full"] and out["bytes_read"] == SIZE
    stored_equals_disk(repo, mnt, disk)


# --- XAPI: lost answers, HTTP 500 and answers that are not XML ----------------------------

def test_a_read_only_call_whose_answer_is_lost_is_retried(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 15)
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "no_answer": True, "count": 2})
    out, _, seconds = succeeds(sim, repo, disk)
    assert calls(sim, "VDI.list_changed_blocks") == 3 and seconds >= 1
    assert not out["full"] and out["blocks_read"] == changed, out
    assert data_snapshots(sim) == []
    stored_equals_disk(repo, mnt, disk)


def test_http_500_on_a_read_only_call(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    # Once: retried, and the run succeeds.
    change(sim, disk, 6)
    sim.post("/fail", {"method": "VDI.get_nbd_info", "http_status": 500, "count": 1})
    out, _, seconds = succeeds(sim, repo, disk)
    assert calls(sim, "VDI.get_nbd_info") == 2 and seconds >= 1
    assert not out["full"] and out["blocks_read"] == 3, out
    stored_equals_disk(repo, mnt, disk)
    # Every time: the call and its 3 retries, then a clean failure, after the snapshot.
    changed = change(sim, disk, 7)
    before = points(repo)
    sim.post("/reset_counters", {})
    sim.post("/fail", {"method": "VDI.get_nbd_info", "http_status": 500, "count": 4})
    p, summary, seconds = ingest(sim, repo, disk)
    assert calls(sim, "VDI.get_nbd_info") == 4 and BACKOFF <= seconds < BACKOFF + 10, seconds
    fails_cleanly(sim, repo, disk, p, summary, before, "HTTP 500")
    assert calls(sim, "VDI.destroy") >= 1           # the snapshot it took went
    next_run_is_right(sim, repo, mnt, disk, changed)


def test_an_answer_that_is_not_xml(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    # Once: retried, and the run succeeds.
    change(sim, disk, 8)
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "malformed": True, "count": 1})
    out, _, _ = succeeds(sim, repo, disk)
    assert calls(sim, "VDI.list_changed_blocks") == 2
    assert not out["full"] and out["blocks_read"] == 3, out
    stored_equals_disk(repo, mnt, disk)
    # Every time: a clean failure that says the answer was not XML.
    changed = change(sim, disk, 9)
    before = points(repo)
    sim.post("/reset_counters", {})
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "malformed": True, "count": 4})
    p, summary, seconds = ingest(sim, repo, disk)
    assert calls(sim, "VDI.list_changed_blocks") == 4 and BACKOFF <= seconds < BACKOFF + 10, seconds
    fails_cleanly(sim, repo, disk, p, summary, before, "XAPI response is not XML")
    next_run_is_right(sim, repo, mnt, disk, changed)


# --- XAPI: the session expires in the middle of a run -------------------------------------

def test_an_expired_session_is_renewed_once(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    # After the snapshot, before the transfer: one new login, and the run goes on with it.
    changed = change(sim, disk, 10)
    sim.post("/fail", {"method": "VDI.get_nbd_info", "expire_session": True, "count": 1})
    out, _, _ = succeeds(sim, repo, disk)
    assert calls(sim, "session.login_with_password") == 2
    assert calls(sim, "VDI.get_nbd_info") == 2
    assert not out["full"] and out["blocks_read"] == changed, out
    assert sim.state()["sessions"] == 0             # the new session was logged out
    stored_equals_disk(repo, mnt, disk)
    # The new session expires at once too: renewed only once per call, so the
    # VDI fails; its snapshot is still removed (with a third session).
    changed = change(sim, disk, 11)
    before = points(repo)
    sim.post("/reset_counters", {})
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "expire_session": True, "count": 2})
    p, summary, _ = ingest(sim, repo, disk)
    assert calls(sim, "VDI.list_changed_blocks") == 2
    assert calls(sim, "session.login_with_password") == 3
    fails_cleanly(sim, repo, disk, p, summary, before, "SESSION_INVALID", "the session expired")
    assert sim.state()["sessions"] == 0
    next_run_is_right(sim, repo, mnt, disk, changed)


# --- NBD: reads that fail or are slow -------------------------------------------------------

def test_nbd_read_errors_for_a_while_are_retried(sim, repo, mnt, disk):
    sim.post("/nbd_faults", {"vdi": disk["uuid"], "read_error_rate": 1, "errors": True})
    cmd = [INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
           "--vdi", disk["uuid"], "--connections", "2", "--json", str(repo)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while read_errors(sim, disk) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        errors = read_errors(sim, disk)
        sim.post("/nbd_faults", {"vdi": disk["uuid"], "errors": False})    # the storage recovers
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert errors > 0, stderr                       # the reads did fail at first
    assert proc.returncode == 0, stderr
    out = json.loads(stdout)["vdis"][0]
    assert out["ok"] and out["full"] and out["bytes_read"] == SIZE, out
    assert data_snapshots(sim) == []
    stored_equals_disk(repo, mnt, disk)


def test_nbd_read_errors_that_persist_fail_cleanly(sim, repo, mnt, disk):
    backed_up(sim, repo, disk)
    changed = change(sim, disk, 12)
    before = points(repo)
    sim.post("/nbd_faults", {"vdi": disk["uuid"], "read_error_rate": 1})
    p, summary, seconds = ingest(sim, repo, disk, "--connections", 2)
    # Each read: 5 retries over new connections, 0.5 to 8 s apart, then the VDI fails.
    assert NBD_BACKOFF <= seconds < NBD_BACKOFF + 15, seconds
    assert read_errors(sim, disk) >= 6
    fails_cleanly(sim, repo, disk, p, summary, before, "NBD read of", "failed after 6 attempts",
                  "Input/output error")
    sim.post("/nbd_faults", {"vdi": disk["uuid"], "errors": False})
    next_run_is_right(sim, repo, mnt, disk, changed)


def test_slow_nbd_reads_still_succeed(sim, repo, mnt, disk):
    delay_ms = 1500
    sim.post("/nbd_faults", {"vdi": disk["uuid"], "read_delay_ms": delay_ms})
    out, _, seconds = succeeds(sim, repo, disk, "--connections", 1)
    assert out["full"] and out["bytes_read"] == SIZE, out
    assert seconds >= delay_ms / 1000, seconds
    assert read_errors(sim, disk) == 0
    assert data_snapshots(sim) == []
    stored_equals_disk(repo, mnt, disk)
