#!/usr/bin/python3
"""An incremental cbtfs-ingest of a pool: 100 disks with 5 % of their 64 KiB
blocks changed each, --jobs 8, against one disk holding the same changed bytes
(issue "ingest at pool scale": target at most 1.5 times as long), and the peak
memory of the pool's run (target at most 256 MiB). The XAPI simulator runs
three hosts; the first (full) runs are not timed. One run each: not a timed
test. The simulator's own costs (it copies and hashes every disk on each
snapshot, and starts an nbdkit per disk, all on this machine's CPUs) are part of
the wall time; the table gives the simulator's CPU time.

CBTFS_BUILD=build /usr/bin/python3 bench/pool_scale.py [--disk-mib 32] [--disks 100] [WORKDIR]"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from conftest import BUILD, REPO_TOOL, run  # noqa: E402
from xapi import Sim                        # noqa: E402

INGEST = os.path.abspath(os.path.join(BUILD, "src", "cbtfs-ingest"))
MIB, BLOCK = 1 << 20, 65536


def ingest(sim, repo, *args):
    """(wall seconds, peak RSS in KiB, CPU seconds, summary) of one run under /usr/bin/time -v."""
    cmd = ["/usr/bin/time", "-v", INGEST, "--xapi", sim.url, "--password-file", sim.password_file,
           "--ca-file", sim.ca_file, "--json", "-q", *map(str, args), str(repo)]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"cbtfs-ingest failed:\n{p.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([0-9.]+)", p.stderr).group(1)) for kind in ("User", "System"))
    summary = json.loads(p.stdout)
    assert summary["ok"], summary
    return wall, rss, cpu, summary


def sim_cpu(sim):
    """CPU seconds of the simulator itself, and of its nbdkit processes that have exited."""
    fields = open(f"/proc/{sim.proc.pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def change(sim, disk, share, rnd):
    """Writes random data into share of the disk's blocks, scattered."""
    blocks = disk["virtual_size"] // BLOCK
    for b in rnd.sample(range(blocks), max(1, int(blocks * share))):
        sim.write(disk["uuid"], b * BLOCK, rnd.randbytes(BLOCK))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk-mib", type=int, default=32)
    ap.add_argument("--disks", type=int, default=100)
    ap.add_argument("workdir", nargs="?", default="/tmp/cbtfs-pool-scale-bench")
    args = ap.parse_args()
    if not os.access("/usr/bin/time", os.X_OK):
        sys.exit("/usr/bin/time is missing: apt-get install time")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n_vms = args.disks // 2
    big = args.disks * args.disk_mib * MIB
    vms = [{"name": f"vm{i:03}", "host": ["h1", "h2", "h3"][i % 3],
            "disks": [{"name": f"d{k}", "size": args.disk_mib * MIB} for k in range(2)]} for i in range(n_vms)]
    vms.append({"name": "big", "disks": [{"name": "d", "size": big}]})
    sim = Sim(work, vms, hosts=["h1", "h2", "h3"])
    rnd = random.Random(5)
    try:
        state = sim.state()
        disks = [v for v in state["vdis"] if not v["is_a_snapshot"]]
        small = [d for d in disks if d["name"] != "d"]
        (bigdisk,) = [d for d in disks if d["name"] == "d"]
        repo = work / "repo"
        run(REPO_TOOL, "init", repo)
        pool = [a for i in range(n_vms) for a in ("--vm", f"vm{i:03}")]
        ingest(sim, repo, *pool, "--jobs", 8)          # full, not timed
        ingest(sim, repo, "--vm", "big")
        for d in small:
            change(sim, d, 0.05, rnd)
        change(sim, bigdisk, 0.05, rnd)
        sim.post("/reset_counters", {})
        cpu0 = sim_cpu(sim)
        wall_pool, rss_pool, cpu_pool, s_pool = ingest(sim, repo, *pool, "--jobs", 8)
        cpu1 = sim_cpu(sim)
        calls = sim.get("/calls")
        served = sum(h["served"] for h in sim.get("/nbd_hosts")["hosts"])
        wall_big, rss_big, cpu_big, s_big = ingest(sim, repo, "--vm", "big", "--connections", 8)
        cpu2 = sim_cpu(sim)
        read_pool = sum(v["bytes_read"] for v in s_pool["vdis"])
        read_big = sum(v["bytes_read"] for v in s_big["vdis"])
        print(f"incremental ingest, 5 % of the blocks changed, one run each, {time.strftime('%Y-%m-%d')}, "
              f"{os.cpu_count()} CPUs")
        print()
        print("| measure | pool | one VDI | ratio | target |")
        print("|---|---:|---:|---:|---|")
        print(f"| disks x size | {len(small)} x {args.disk_mib} MiB | 1 x {big // MIB} MiB | | |")
        print(f"| bytes read over NBD | {read_pool / MIB:.1f} MiB | {read_big / MIB:.1f} MiB | | |")
        print(f"| wall time (--jobs 8) | {wall_pool:.1f} s | {wall_big:.1f} s | {wall_pool / wall_big:.2f} | <= 1.5 |")
        print(f"| cbtfs-ingest CPU (user + system) | {cpu_pool:.1f} s | {cpu_big:.1f} s | | |")
        print(f"| simulator CPU: itself / its nbdkits | {cpu1[0] - cpu0[0]:.1f} / {cpu1[1] - cpu0[1]:.1f} s "
              f"| {cpu2[0] - cpu1[0]:.1f} / {cpu2[1] - cpu1[1]:.1f} s | | |")
        print(f"| XAPI calls per disk | {sum(calls.values()) / len(small):.1f} | | | |")
        print(f"| NBD connections | {served} | | | |")
        print(f"| peak RSS | {rss_pool / 1024:.0f} MiB | {rss_big / 1024:.0f} MiB | | pool <= 256 MiB |")
        print()
        print("XAPI calls of the pool's run, most frequent first:",
              ", ".join(f"{m} {n}" for m, n in sorted(calls.items(), key=lambda kv: -kv[1])))
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
