"""cbtfs-ingest at pool scale against the XAPI simulator: several hosts, each
with xapi-nbd's connection limit (the simulator counts the connections every
host saw at once), real HTTPS XML-RPC and real nbdkit. Disks are a few MiB
and sparse: what is tested is the bookkeeping, not the bandwidth."""

import json
import os
import subprocess
import time

from xapi import Sim

BUILD_SRC = os.path.join(os.environ.get("CBTFS_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build")), "src")
INGEST = os.path.abspath(os.path.join(BUILD_SRC, "cbtfs-ingest"))
MIB = 1 << 20
BLOCK = 65536


def ingest(sim, repo, *args, check=True):
    cmd = [INGEST, "--xapi", sim.url, "--user", "root", "--password-file", sim.password_file,
           "--ca-file", sim.ca_file, "--json"]
    p = subprocess.run(cmd + [str(a) for a in args] + [str(repo)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"cbtfs-ingest failed with {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p, json.loads(p.stdout) if p.stdout.strip() else None


def nbd_hosts(sim):
    return {h["name"]: h for h in sim.get("/nbd_hosts")["hosts"]}


def data_snapshots(sim):
    return [v for v in sim.vdis() if v.get("is_a_snapshot") and v["type"] != "cbt_metadata"]


def test_a_busy_nbd_server_is_waited_out_then_a_clear_error(tmp_path, repo):
    """The host serves 2 connections, cbtfs may open 4: a transfer that finds the
    server busy waits for it instead of failing; one that never gets in fails with
    a message that says why, and leaves no snapshot with data behind."""
    vms = [{"name": f"vm{i}", "disks": [{"name": "d", "size": 16 * MIB}]} for i in range(3)]
    sim = Sim(tmp_path, vms, nbd_limit=2)
    try:
        for vm in vms:
            uuid = sim.disks_of(vm["name"])[0]["uuid"]
            sim.write(uuid, 0, b"x" * BLOCK)
            # Slow reads keep the transfers (8 requests of 2 MiB each) going at once.
            sim.post("/nbd_faults", {"vdi": uuid, "read_delay_ms": 150})
        p, summary = ingest(sim, repo, *(a for vm in vms for a in ("--vm", vm["name"])),
                            "--jobs", 3, "--connections", 4, "--host-connections", 4, "--busy-timeout", 60)
        assert summary["ok"] and len(summary["vdis"]) == 3 and all(v["full"] for v in summary["vdis"])
        counters = nbd_hosts(sim)["xapi-sim"]
        assert counters["busy"] > 0, counters          # the server did say busy
        assert 2 < counters["peak"] <= 4, counters       # cbtfs tried past the server's limit, never past its own
        assert "is busy" in p.stderr

        sim.write(sim.disks_of("vm0")[0]["uuid"], 3 * MIB, b"y" * BLOCK)
        sim.post("/nbd_limit", {"limit": 0})           # another tool holds every connection
        start = time.monotonic()
        p, summary = ingest(sim, repo, "--vm", "vm0", "--busy-timeout", 3, check=False)
        assert p.returncode == 1
        assert time.monotonic() - start < 60
        (vdi,) = summary["vdis"]
        assert not vdi["ok"] and "refused every NBD connection for 3 s" in vdi["error"], vdi
        assert "--host-connections" in vdi["error"]
        assert not data_snapshots(sim)
    finally:
        sim.stop()
