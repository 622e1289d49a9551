#!/usr/bin/python3
"""A full cbtfs-ingest of one VDI over NBD with latency, against nbdcopy with
the same number of connections reading the same export. The XAPI simulator
serves the disk through nbdkit with its delay filter (every read answered
that many milliseconds late, as over a link with that round trip), and
with --links, through its rate filter too (the link's bandwidth, shared by
every connection), without TLS so that nbdcopy can read it too. The rate
filter's token bucket starts full, so a server's first seconds run at full
speed: a row with a link needs a disk many times larger than what the link
carries in those seconds, or it measures the burst. The disk is incompressible random data.
Prints one side-by-side table: MB/s of each and their ratio (cbtfs / nbdcopy).

cbtfs-ingest's time is the one it reports for the disk (reading and storing:
it also compresses, checksums and writes the repository). nbdcopy copies to
a file beside the repository with --flush, which is what an ingest does
(read, then land the bytes on disk; bench/run.py compares the same way), and
the ratio is against that copy. nbdcopy to null: (reading only) is shown too,
as the link's ceiling. Neither counts the snapshot. The last column is the
ingest process's CPU time (user and system) per GiB read: on a machine where
the NBD server runs on the same cores, it tells whether the ingest is bound
by the link or by the CPU it shares. One run per row: not a
timed test.

CBTFS_BUILD=build /usr/bin/python3 bench/ingest_latency.py [--size-mib 256] [--connections 4,8] [--delays 0,10,50] [--links 0,1000] [--format 2] [WORKDIR]"""

import argparse
import json
import resource
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


def nbdcopy(sim, uuid, connections, size, dst):
    """MB/s of nbdcopy from the VDI's export to dst (a file, copied with --flush, or null:)."""
    proxy, session = sim.xapi()
    (info,) = proxy.VDI.get_nbd_info(session, proxy.VDI.get_by_uuid(session, uuid)["Value"])["Value"]
    flush = [] if dst == "null:" else ["--flush"]
    start = time.monotonic()
    run("nbdcopy", f"--connections={connections}", *flush, f"nbd://{info['address']}:{info['port']}/", dst)
    secs = time.monotonic() - start
    if dst != "null:":
        os.unlink(dst)
    return size / secs / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--connections", default="4,8")
    ap.add_argument("--delays", default="0,10,50")
    ap.add_argument("--links", default="0", help="link bandwidths in Mbit/s, 0 for none")
    ap.add_argument("--format", default="2", help="of the repository (2, the default, hashes every block with "
                    "HMAC-SHA-256 for deduplication; 1 does not)")
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
        print(f"full read of a {args.size_mib} MiB VDI of random data over NBD (no TLS) into a format {args.format} "
              "repository, one run each, "
              f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
        print()
        print("| read delay | link | connections | cbtfs-ingest MB/s | nbdcopy to a file MB/s | ratio "
              "| nbdcopy to null: MB/s | cbtfs-ingest CPU s per GiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = [(int(d), int(l), int(c)) for l in args.links.split(",") for d in args.delays.split(",")
                for c in args.connections.split(",")]
        for delay, link, conns in rows:
            sim.post("/nbd_faults", {"vdi": disk["uuid"], "read_delay_ms": delay, "link_mbit": link})
            repo = work / f"repo-{delay}-{conns}"
            run(REPO_TOOL, "init", "--format", args.format, repo)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            got, secs = cbtfs_ingest(sim, repo, conns)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            ours = got / secs / 1e6
            theirs = nbdcopy(sim, disk["uuid"], conns, size, str(work / "copy.raw"))
            ceiling = nbdcopy(sim, disk["uuid"], conns, size, "null:")
            link_text = f"{link} Mbit/s" if link else "-"
            print(f"| {delay} ms | {link_text} | {conns} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} "
                  f"| {ceiling:.0f} | {cpu / (got / (1 << 30)):.2f} |", flush=True)
            shutil.rmtree(repo)
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
