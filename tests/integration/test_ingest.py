"""cbtfs-ingest against the XAPI simulator: real HTTPS XML-RPC, real nbdkit
over TLS, real FUSE mounts for checking what was stored."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import (BACKEND, BLOCK, REPO_TOOL, CoreDumps, Mount, after_kill, files_equal, flip_object_byte, ls_json,
                      pack_of_point, repo_tool, run)
from xapi import PASSWORD, Sim

BUILD_SRC = os.path.join(os.environ.get("CBTFS_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build")), "src")
INGEST = os.path.abspath(os.path.join(BUILD_SRC, "cbtfs-ingest"))
MIB = 1 << 20


def ingest(sim, repo, *args, check=True, ca=True):
    cmd = [INGEST, "--xapi", sim.url, "--user", "root", "--password-file", sim.password_file]
    if ca:
        cmd += ["--ca-file", sim.ca_file]
    p = subprocess.run(cmd + [str(a) for a in args] + [str(repo)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"cbtfs-ingest failed with {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path, [
        {"name": "web01", "cd": True, "disks": [
            {"name": "system", "size": 48 * MIB},
            {"name": "data", "size": 20 * MIB + 3 * 512},  # not a multiple of 64 KiB
        ]},
        {"name": "db01", "disks": [{"name": "db", "size": 8 * MIB}]},
    ])
    yield s
    s.stop()


def snapshot_files(sim, disks, dest, tag):
    """Copies of each disk as it is now: what the next point must hold."""
    out = {}
    for d in disks:
        p = dest / f"{d['uuid']}-{tag}.img"
        shutil.copyfile(d["path"], p)
        out[d["uuid"]] = str(p)
    return out


def no_data_snapshots_left(sim):
    """Only metadata-only snapshots may stay on the host."""
    left = [v for v in sim.vdis() if v.get("is_a_snapshot") and v["type"] != "cbt_metadata"]
    assert not left, left


def test_rounds_of_ingest_equal_the_disks(sim, repo, mnt, tmp_path):
    disks = sim.disks_of("web01")
    sysdisk, datadisk = disks
    run("mkfs.ext4", "-q", "-F", sysdisk["path"])
    rnd = random.Random(3)
    sim.write(datadisk["uuid"], 0, rnd.randbytes(2 * MIB))
    states = []
    for rnd_no in range(3):
        if rnd_no == 1:
            sim.write(sysdisk["uuid"], 5 * BLOCK + 100, b"\x01")                # one byte
            sim.write(datadisk["uuid"], 3 * MIB, rnd.randbytes(MIB))            # a whole range
            size = datadisk["virtual_size"]
            sim.write(datadisk["uuid"], size - 700, rnd.randbytes(700))         # the last partial block
        if rnd_no == 2:
            sim.write(sysdisk["uuid"], 40 * MIB, rnd.randbytes(BLOCK + 1))
        p = ingest(sim, repo, "--vm", "web01", "--json")
        summary = json.loads(p.stdout)
        assert summary["ok"] and len(summary["vdis"]) == 2
        assert all(v["full"] == (rnd_no == 0) for v in summary["vdis"]), summary
        states.append(snapshot_files(sim, disks, tmp_path, rnd_no))
        no_data_snapshots_left(sim)
        # exactly one metadata-only snapshot per disk remains: the one the next run needs
        for d in disks:
            assert len(sim.snapshots_of(d["uuid"])) == 1
    vdis = {v["uuid"]: v for v in ls_json(repo)["vdis"]}
    assert set(vdis) == {d["uuid"] for d in disks}
    with Mount(repo, mnt) as m:
        for d in disks:
            pts = vdis[d["uuid"]]["points"]
            assert len(pts) == 3
            assert vdis[d["uuid"]]["vm_name"] == "web01"
            for i, p in enumerate(pts):
                assert files_equal(m.path(p["path"]), states[i][d["uuid"]]), (d["name"], i)
            host = {v["uuid"] for v in sim.snapshots_of(d["uuid"])}
            assert pts[-1]["snapshot_uuid"] in host
        assert sorted(os.listdir(m.path("by-name", "web01"))) == ["data", "system"]


def test_only_changed_blocks_travel(sim, repo):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, random.Random(1).randbytes(8 * MIB))
    ingest(sim, repo, "--vdi", db["uuid"])
    changed = [3, 4, 5, 77, 127]  # 127 is the last block
    for b in changed:
        sim.write(db["uuid"], b * BLOCK + 10, b"x")
    sim.post("/reset_counters", {})
    p = ingest(sim, repo, "--vdi", db["uuid"], "--json")
    out = json.loads(p.stdout)["vdis"][0]
    assert not out["full"]
    assert out["blocks_read"] == len(changed)
    assert sim.nbd_bytes(db["uuid"]) == len(changed) * BLOCK
    assert out["bytes_read"] == len(changed) * BLOCK


def test_chain_breaks_start_a_new_full_base(sim, repo, mnt, tmp_path):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, random.Random(2).randbytes(MIB))
    ingest(sim, repo, "--vdi", db["uuid"])

    def run_and_reason():
        p = ingest(sim, repo, "--vdi", db["uuid"], "--json")
        out = json.loads(p.stdout)["vdis"][0]
        return out, p.stderr

    # CBT disabled behind our back (a storage migration does that)
    sim.post("/disable_cbt", {"vdi": db["uuid"]})
    out, log = run_and_reason()
    assert out["full"] and "changed block tracking" in out["chain_reason"], (out, log)
    assert "new full chain" in log
    # the previous snapshot destroyed by someone
    proxy, session = sim.xapi()
    prev = proxy.VDI.get_by_uuid(session, out["snapshot_uuid"])["Value"]
    assert proxy.VDI.destroy(session, prev)["Status"] == "Success"
    out, _ = run_and_reason()
    assert out["full"] and "gone" in out["chain_reason"]
    # the host says the snapshots are unrelated
    sim.post("/fail", {"method": "VDI.list_changed_blocks",
                       "error": ["SR_BACKEND_FAILURE_460", "", "Source and target VDI are unrelated", ""], "count": 1})
    out, _ = run_and_reason()
    assert out["full"] and "SR_BACKEND_FAILURE_460" in out["chain_reason"]
    # resized
    sim.post("/resize", {"vdi": db["uuid"], "size": 12 * MIB})
    sim.write(db["uuid"], 11 * MIB, b"after resize")
    out, _ = run_and_reason()
    assert out["full"] and "virtual size changed" in out["chain_reason"]
    expect = tmp_path / "expect.img"
    shutil.copyfile(sim.vdi(db["uuid"])["path"], expect)
    # and a normal delta after all that
    sim.write(db["uuid"], 0, b"delta again")
    out, _ = run_and_reason()
    assert not out["full"]
    pts = ls_json(repo)["vdis"][0]["points"]
    assert [p["full"] for p in pts] == [True, True, True, True, True, False]
    assert "changed block tracking" in pts[1]["chain_reason"]
    assert repo_tool("verify", repo).returncode == 0
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(pts[4]["path"]), expect)
        assert files_equal(m.path(pts[5]["path"]), sim.vdi(db["uuid"])["path"])
    no_data_snapshots_left(sim)


def test_failures_leave_no_half_point_and_no_data_snapshot(sim, repo):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, b"hello")
    # wrong password: exit 4, a clear message, the password not echoed
    bad = sim.password_file + ".bad"
    with open(bad, "w") as f:
        f.write("wrong-password\n")
    p = subprocess.run([INGEST, "--xapi", sim.url, "--password-file", bad, "--ca-file", sim.ca_file,
                        "--vdi", db["uuid"], str(repo)], capture_output=True, text=True)
    assert p.returncode == 4 and "wrong user name or password" in p.stderr
    assert "wrong-password" not in p.stderr + p.stdout
    # an untrusted certificate: refused unless --insecure
    p = ingest(sim, repo, "--vdi", db["uuid"], check=False, ca=False)
    assert p.returncode == 4 and "certificate" in p.stderr
    # a failing snapshot: exit 1, nothing committed, nothing left on the host
    sim.post("/fail", {"method": "Async.VDI.snapshot", "error": ["SR_BACKEND_FAILURE_44", "", "no space", ""], "count": 1})
    p = ingest(sim, repo, "--vdi", db["uuid"], check=False)
    assert p.returncode == 1 and "FAILED" in p.stderr and "SR_BACKEND_FAILURE_44" in p.stderr
    assert ls_json(repo)["vdis"] == []
    # NBD failing for good during the transfer: no point, the snapshot destroyed
    sim.post("/fail", {"method": "VDI.get_nbd_info", "error": ["VDI_INCOMPATIBLE_TYPE", "x", "y"], "count": 1})
    p = ingest(sim, repo, "--vdi", db["uuid"], check=False)
    assert p.returncode == 1
    assert ls_json(repo)["vdis"] == []
    no_data_snapshots_left(sim)
    assert sim.snapshots_of(db["uuid"]) == []
    # and a clean run afterwards works, with --insecure too
    p = ingest(sim, repo, "--vdi", db["uuid"], "--insecure", ca=False)
    assert len(ls_json(repo)["vdis"][0]["points"]) == 1
    assert repo_tool("verify", repo).returncode == 0


def test_a_dropped_nbd_connection_is_retried(sim, repo, mnt):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, random.Random(4).randbytes(8 * MIB))
    sim.post("/nbd_drop", {"vdi": db["uuid"], "after_bytes": 3 * MIB})
    p = ingest(sim, repo, "--vdi", db["uuid"], "--connections", "1")
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(db["uuid"], "latest.raw"), sim.vdi(db["uuid"])["path"])


def test_password_from_environment_and_jobs(sim, repo):
    env = dict(os.environ, CBTFS_PASSWORD=open(sim.password_file).read().strip())
    p = subprocess.run([INGEST, "--xapi", sim.url, "--ca-file", sim.ca_file, "--vm", "web01", "--vm", "db01",
                        "--jobs", "3", "--json", str(repo)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["vdis"]) == 3
    assert PASSWORD not in p.stdout + p.stderr  # the --json summary and the log
    # a VM that does not exist: its own failure, exit 1
    p = subprocess.run([INGEST, "--xapi", sim.url, "--ca-file", sim.ca_file, "--vm", "nope", "--vm", "db01",
                        str(repo)], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "no VM named 'nope'" in p.stderr
    assert len(ls_json(repo)["vdis"]) == 3


def test_no_cbt_metadata_starts_a_new_chain(sim, repo):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, b"first")
    ingest(sim, repo, "--vdi", db["uuid"])
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "error": ["VDI_NO_CBT_METADATA", "OpaqueRef:x"], "count": 1})
    out = json.loads(ingest(sim, repo, "--vdi", db["uuid"], "--json").stdout)["vdis"][0]
    assert out["full"] and "no changed-block metadata" in out["chain_reason"]


# Every XAPI call an incremental run makes, failing once: the run fails or
# copes, but never leaves a half point or a snapshot with data, and the next
# run works.
CALLS = ["VDI.get_by_uuid", "VDI.get_record", "VBD.get_record", "VM.get_record", "Async.VDI.snapshot",
         "task.get_status", "task.get_result",
         "VDI.set_name_label", "VDI.list_changed_blocks", "VDI.get_nbd_info", "VDI.data_destroy", "VDI.destroy"]


# On S3 the calls that come before the transfer fail the same way as on a
# local repository, which they have not touched yet: the S3 run takes the
# ones around the commit.
CALLS_AROUND_THE_COMMIT = ["VDI.get_nbd_info", "VDI.data_destroy", "VDI.destroy"]


def test_an_error_on_each_xapi_call(sim, repo):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, random.Random(7).randbytes(MIB))
    ingest(sim, repo, "--vdi", db["uuid"])
    sim.post("/reset_counters", {})
    for i, method in enumerate(CALLS if BACKEND == "local" else CALLS_AROUND_THE_COMMIT):
        sim.write(db["uuid"], (i % 8) * MIB, f"change {i}".encode())
        points = len(ls_json(repo)["vdis"][0]["points"])
        sim.post("/fail", {"method": method, "error": ["INTERNAL_ERROR", f"injected into {method}"], "count": 1})
        p = ingest(sim, repo, "--vdi", db["uuid"], check=False)
        assert p.returncode in (0, 1), (method, p.stderr)
        if p.returncode == 1:
            assert "FAILED" in p.stderr and "INTERNAL_ERROR" in p.stderr, (method, p.stderr)
        assert len(ls_json(repo)["vdis"][0]["points"]) == points + (p.returncode == 0), method
        no_data_snapshots_left(sim)
        assert repo_tool("verify", repo).returncode == 0
        # A fault the run did not reach is still armed: one more run uses it up.
        if sim.get("/calls").get(method, 0) == 0:
            ingest(sim, repo, "--vdi", db["uuid"], check=False)
        ingest(sim, repo, "--vdi", db["uuid"])
        no_data_snapshots_left(sim)
        sim.post("/reset_counters", {})


def test_a_full_repository_disk(sim, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small)
    try:
        repo = small / "repo"
        repo_tool("init", repo)
        db = sim.disks_of("db01")[0]
        sim.write(db["uuid"], 0, random.Random(9).randbytes(8 * MIB))  # incompressible: cannot fit
        p = ingest(sim, repo, "--vdi", db["uuid"], check=False)
        assert p.returncode == 1 and "No space left on device" in p.stderr, p.stderr
        assert ls_json(repo)["vdis"] == []
        no_data_snapshots_left(sim)
        run("mount", "-o", "remount,size=64m", small)
        ingest(sim, repo, "--vdi", db["uuid"])
        assert len(ls_json(repo)["vdis"][0]["points"]) == 1
        assert repo_tool("verify", repo).returncode == 0
    finally:
        run("umount", small, check=False)


def test_two_ingests_of_one_vdi_at_once(sim, repo):
    db = sim.disks_of("db01")[0]
    sim.write(db["uuid"], 0, random.Random(10).randbytes(8 * MIB))
    cmd = [INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
           "--vdi", db["uuid"], str(repo)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 0], [0, 1]), results
    if codes == [0, 1]:
        msg = next(r[1] for r in results if r[0] == 1)
        assert "being written by another process" in msg
    assert len(ls_json(repo)["vdis"][0]["points"]) == codes.count(0)
    no_data_snapshots_left(sim)
    assert repo_tool("verify", repo).returncode == 0


# Moments at which a run is killed: while the host holds up the given call
# (the call itself is then never made), or in the middle of the NBD transfer.
KILL_MOMENTS = [
    ("vdi", "Async.VDI.snapshot"),       # journal written, no snapshot yet
    ("vdi", "task.get_status"),          # snapshot being taken, its task journaled
    ("vdi", "VDI.set_name_label"),       # snapshot taken, not yet named as ours
    ("vdi", "VDI.list_changed_blocks"),
    ("vdi", "nbd"),
    ("vdi", "VDI.data_destroy"),         # point committed, snapshot still holds data
    ("vm", "VM.snapshot"),
    ("vm", "VDI.set_name_label"),
    ("vm", "nbd"),
    ("vm", "VM.destroy"),                # points committed, snapshot VM still there
    ("vm", "VDI.data_destroy"),
]
# Kills before the transfer leave the repository as it was, whatever holds
# it: on S3 the moments that write it, or just did.
S3_KILL_MOMENTS = [m for m in KILL_MOMENTS if m[1] in ("nbd", "VDI.data_destroy", "VM.destroy")]


def points_of(repo, uuid):
    return next((len(v["points"]) for v in ls_json(repo)["vdis"] if v["uuid"] == uuid), 0)


def test_kill_9_at_many_moments(sim, repo, mnt, tmp_path):
    db = sim.disks_of("db01")[0]
    web = sim.disks_of("web01")
    rnd = random.Random(11)
    sim.write(db["uuid"], 0, rnd.randbytes(8 * MIB))
    ingest(sim, repo, "--vdi", db["uuid"])
    ingest(sim, repo, "--vm", "web01")
    cmd = [INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file]
    for mode, moment in KILL_MOMENTS if BACKEND == "local" else S3_KILL_MOMENTS:
        target = ["--vdi", db["uuid"]] if mode == "vdi" else ["--vm", "web01"]
        disks = [db] if mode == "vdi" else web
        for d in disks:
            sim.write(d["uuid"], rnd.randrange(d["virtual_size"] - 4 * MIB), rnd.randbytes(4 * MIB))
        before = {d["uuid"]: points_of(repo, d["uuid"]) for d in disks}
        sim.post("/reset_counters", {})
        if moment != "nbd":
            sim.post("/fail", {"method": moment, "delay": 2, "count": 1})
        proc = subprocess.Popen(cmd + target + [str(repo)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            reached = (any(sim.nbd_bytes(d["uuid"]) for d in disks) if moment == "nbd"
                       else sim.get("/calls").get(moment, 0) > 0)
            if reached or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        assert reached, (mode, moment, proc.stderr.read())
        time.sleep(2.5)  # until the held call would have been made
        after_kill()
        left = [v for v in sim.vdis() if v.get("is_a_snapshot") and v["type"] != "cbt_metadata"]
        assert bool(left) == (moment not in ("Async.VDI.snapshot", "VM.snapshot")), (mode, moment, left)

        assert repo_tool("verify", repo).returncode == 0, (mode, moment)
        for d in disks:
            assert points_of(repo, d["uuid"]) - before[d["uuid"]] in (0, 1), (mode, moment)
        # The next run cleans up what the killed one left and succeeds.
        ingest(sim, repo, *target)
        no_data_snapshots_left(sim)
        assert not [v for v in sim.state()["vms"] if v.get("is_a_snapshot")], (mode, moment)
        for d in disks:
            snaps = sim.snapshots_of(d["uuid"])
            assert len(snaps) == 1 and snaps[0]["type"] == "cbt_metadata", (mode, moment, snaps)
            assert points_of(repo, d["uuid"]) > before[d["uuid"]]
    # What the last runs stored is what the disks hold.
    vdis = {v["uuid"]: v for v in ls_json(repo)["vdis"]}
    with Mount(repo, mnt) as m:
        for d in [db] + web:
            assert files_equal(d["path"], m.path(vdis[d["uuid"]]["points"][-1]["path"])), d["name"]


@pytest.mark.same_on_every_backend
def test_a_pool_member_sends_us_to_its_master(sim, repo):
    db = sim.disks_of("db01")[0]
    sim.post("/fail", {"method": "session.login_with_password", "error": ["HOST_IS_SLAVE", "127.0.0.1"], "count": 1})
    member = sim.url.replace("127.0.0.1", "localhost")
    p = subprocess.run([INGEST, "--xapi", member, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
                        "--vdi", db["uuid"], str(repo)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"{member} is a pool member; using the pool master at https://127.0.0.1:" in p.stderr, p.stderr
    assert sim.get("/calls")["session.login_with_password"] == 2
    assert points_of(repo, db["uuid"]) == 1


def test_a_busy_vdi_is_waited_for(sim, repo):
    db = sim.disks_of("db01")[0]
    ingest(sim, repo, "--vdi", db["uuid"])
    sim.write(db["uuid"], 3 * BLOCK, b"busy")
    sim.post("/reset_counters", {})
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "error": ["VDI_IN_USE", "OpaqueRef:x", "list_changed_blocks"],
                       "count": 2})
    summary = json.loads(ingest(sim, repo, "--vdi", db["uuid"], "--json").stdout)
    assert summary["ok"] and not summary["vdis"][0]["full"], summary
    assert summary["vdis"][0]["blocks_read"] == 1, summary
    assert sim.get("/calls")["VDI.list_changed_blocks"] == 3


def restore_cmd(sim, repo, vdi, sr, *extra):
    return [REPO_TOOL, "restore", "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
            "--sr", sr, *extra, str(repo), vdi, "latest"]


def test_restore_to_xenserver(sim, repo, tmp_path):
    disk = sim.disks_of("web01")[1]  # 20 MiB + 1536 bytes: not a multiple of 64 KiB
    rnd = random.Random(21)
    sim.write(disk["uuid"], 0, rnd.randbytes(3 * MIB))
    sim.write(disk["uuid"], disk["virtual_size"] - 1000, rnd.randbytes(1000))
    ingest(sim, repo, "--vdi", disk["uuid"])
    expect = tmp_path / "expect.img"
    shutil.copyfile(disk["path"], expect)
    sim.write(disk["uuid"], 0, b"written after the backup")
    proxy, session = sim.xapi()
    sr_ref = proxy.VDI.get_SR(session, proxy.VDI.get_by_uuid(session, disk["uuid"])["Value"])["Value"]
    sr = proxy.SR.get_uuid(session, sr_ref)["Value"]

    p = run(*restore_cmd(sim, repo, disk["uuid"], sr, "--name", "data, restored"))
    new = sim.vdi(p.stdout.strip())
    assert new["name"] == "data, restored" and not new["is_a_snapshot"]
    assert new["virtual_size"] == disk["virtual_size"]
    assert files_equal(new["path"], expect)
    assert "restored" in p.stderr and new["uuid"] in p.stderr

    # A damaged block stops the upload, and the new VDI goes with it.
    before = {v["uuid"] for v in sim.vdis()}
    pack = pack_of_point(repo, disk["uuid"])
    flip_object_byte(repo, pack, 5000)
    p = run(*restore_cmd(sim, repo, disk["uuid"], sr), check=False)
    assert p.returncode == 1 and "checksum" in p.stderr, p.stderr
    assert {v["uuid"] for v in sim.vdis()} == before
    # The host answers 200 before it reads the body and fails the import
    # later, through the task: the restore fails and the new VDI goes.
    flip_object_byte(repo, pack, 5000)  # repaired
    sim.post("/import_fail", {"after_bytes": 2 * MIB})
    p = run(*restore_cmd(sim, repo, disk["uuid"], sr), check=False)
    assert p.returncode != 0 and "VDI_IO_ERROR" in p.stderr, p.stderr
    assert {v["uuid"] for v in sim.vdis()} == before
    assert not [t for t in sim.state()["tasks"] if t["status"] == "pending"]
    # So does an SR that does not exist, before anything is created.
    p = run(*restore_cmd(sim, repo, disk["uuid"], "00000000-0000-4000-8000-000000000000"), check=False)
    assert p.returncode != 0 and "UUID_INVALID" in p.stderr, p.stderr
    assert {v["uuid"] for v in sim.vdis()} == before


@pytest.mark.same_on_every_backend
def test_no_core_dump_can_carry_the_password(sim, repo, tmp_path):
    with CoreDumps(tmp_path / "cores") as dumps:
        # cbtfs-ingest, logged in (the password is in its memory), held up by the host.
        db = sim.disks_of("db01")[0]
        sim.post("/reset_counters", {})
        sim.post("/fail", {"method": "Async.VDI.snapshot", "delay": 2, "count": 1})
        p = subprocess.Popen([INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file",
                              sim.ca_file, "--vdi", db["uuid"], str(repo)], preexec_fn=dumps.preexec,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while sim.get("/calls").get("Async.VDI.snapshot", 0) == 0:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        # Nor is it on the command line anyone can read in /proc.
        assert PASSWORD.encode() not in open(f"/proc/{p.pid}/cmdline", "rb").read()
        p.send_signal(signal.SIGABRT)
        p.wait()
        assert p.returncode == -signal.SIGABRT
        left = dumps.cores(wait=0)  # a dumping process is reaped after its core is written
        assert all(PASSWORD.encode() not in c.read_bytes() for c in left)
        assert not left, "cbtfs-ingest dumped core while holding the password"
    time.sleep(2.5)  # the held call is dropped; the next run is clean
    ingest(sim, repo, "--vdi", db["uuid"])
    no_data_snapshots_left(sim)


@pytest.mark.same_on_every_backend
@pytest.mark.parametrize("pin", ["right", "other"])
def test_nbd_tls_when_the_certificate_names_a_host_that_does_not_resolve(tmp_path, repo, mnt, pin):
    """A dedicated backup network: XAPI gives the NBD address 127.0.0.1 and
    a certificate for 'xenhost.backup.invalid' only (no address in it).
    Without --insecure-nbd the run verifies the server by that exact
    certificate; a server presenting another one (another key, same name)
    is refused. --insecure (XAPI's TLS) changes nothing for NBD."""
    sim = Sim(tmp_path, [{"name": "db01", "disks": [{"name": "db", "size": 4 * MIB}]}],
              nbd_host_name="xenhost.backup.invalid", nbd_pin=pin)
    try:
        db = sim.disks_of("db01")[0]
        sim.write(db["uuid"], 0, random.Random(30).randbytes(2 * MIB))
        p = ingest(sim, repo, "--vdi", db["uuid"], check=False)
        if pin == "right":
            assert p.returncode == 0, p.stderr
            sim.write(db["uuid"], 3 * MIB, b"second run")
            p = ingest(sim, repo, "--vdi", db["uuid"], "--insecure")
            assert "--insecure: XAPI's certificate is not verified" in p.stderr
            with Mount(repo, mnt) as m:
                assert files_equal(m.path(db["uuid"], "latest.raw"), sim.vdi(db["uuid"])["path"])
        else:
            assert p.returncode == 1, p.stderr
            assert "not the one XAPI gave for it" in p.stderr, p.stderr
            p = ingest(sim, repo, "--vdi", db["uuid"], "--insecure", check=False)  # XAPI's opt-out is not NBD's
            assert p.returncode == 1 and "not the one XAPI gave for it" in p.stderr, p.stderr
            assert ls_json(repo)["vdis"] == []
            no_data_snapshots_left(sim)
            # The explicit opt-out for NBD alone still works.
            p = ingest(sim, repo, "--vdi", db["uuid"], "--insecure-nbd")
            assert len(ls_json(repo)["vdis"][0]["points"]) == 1
    finally:
        sim.stop()
