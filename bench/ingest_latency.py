#!/usr/bin/python3
"""A full cbtfs-ingest of one VDI over NBD with latency, against nbdcopy with
the same number of connections reading the same export. The XAPI simulator
serves the disk through nbdkit with its delay filter (every read answered
that many milliseconds late, as over a link with that round trip), without
TLS so that nbdcopy can read it too. The disk is incompressible random data.
Prints one side-by-side table: MB/s of each and their ratio (cbtfs / nbdcopy).

cbtfs-ingest's time is the one it reports for the disk (reading and storing:
it also compresses, checksums and writes the repository); nbdcopy writes to
null:. Neither counts the snapshot. One run per row: not a timed test.

CBTFS_BUILD=build /usr/bin/python3 bench/ingest_latency.py [--size-mib 256] [--connections 4,8] [--delays 0,10,50] [WORKDIR]"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from conftest import BUILD, REPO_TOOL, run  # noqa: E402
from xapi import Sim                        # noqa: E402

INGEST = os.path.abspath(os.path.join(BUILD, "src", "cbtfs-ingest"))
MIB = 1 << 20


def cbtfs_ingest(sim, repo, connections):
    p = run(INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
            "--insecure-nbd", "--vm", "bench", "--connections", connections, "--host-connections", connections,
            "--json", "-q", repo)
    (vdi,) = json.loads(p.stdout)["vdis"]
    assert vdi["ok"] and vdi["full"], vdi
    return vdi["bytes_read"], vdi["seconds"]


def nbdcopy(sim, uuid, connections, size):
    proxy, session = sim.xapi()
    (info,) = proxy.VDI.get_nbd_info(session, proxy.VDI.get_by_uuid(session, uuid)["Value"])["Value"]
    start = time.monotonic()
    run("nbdcopy", f"--connections={connections}", f"nbd://{info['address']}:{info['port']}/", "null:")
    return size, time.monotonic() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--connections", default="4,8")
    ap.add_argument("--delays", default="0,10,50")
    ap.add_argument("workdir", nargs="?", default="/tmp/cbtfs-ingest-latency-bench")
    args = ap.parse_args()
    for tool in ("nbdcopy", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install libnbd-bin nbdkit")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = args.size_mib * MIB
    sim = Sim(work, [{"name": "bench", "disks": [{"name": "d", "size": size}]}], nbd="insecure")
    try:
        (disk,) = sim.disks_of("bench")
        with open(disk["path"], "r+b") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        print(f"full read of a {args.size_mib} MiB VDI of random data over NBD (no TLS), one run each, "
              f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
        print()
        print("| read delay | connections | cbtfs-ingest MB/s | nbdcopy MB/s | ratio |")
        print("|---:|---:|---:|---:|---:|")
        for delay in (int(d) for d in args.delays.split(",")):
            sim.post("/nbd_faults", {"vdi": disk["uuid"], "read_delay_ms": delay})
            for conns in (int(c) for c in args.connections.split(",")):
                repo = work / f"repo-{delay}-{conns}"
                run(REPO_TOOL, "init", repo)
                got, secs = cbtfs_ingest(sim, repo, conns)
                ours = got / secs / 1e6
                got, secs = nbdcopy(sim, disk["uuid"], conns, size)
                theirs = got / secs / 1e6
                print(f"| {delay} ms | {conns} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |", flush=True)
                shutil.rmtree(repo)
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
