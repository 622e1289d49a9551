#!/usr/bin/python3
"""Retention and restore figures, measured in one run.

  sudo /usr/bin/python3 bench/retention.py [--size-mib 1024] [--points 100] [--build build]

1. A chain of N points of one disk (a mixed image, then 1 % of its blocks
   rewritten per point, one point an hour), then `cbtfs-repo prune
   --keep-last 24 --keep-daily 7`: its time, the points removed, and the
   disk space given back (du of the repository before and after).
2. Restoring the newest point: `cbtfs-repo restore` to a file next to
   `cp --sparse=always` from the mount followed by `sync` of the copy (restore
   makes its file durable before it reports success), page cache dropped
   before each, both results compared with the disk as it was.

Prints a Markdown table; data lives under /work/bench-tmp/retention.
"""
import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.dont_write_bytecode = True
sys.path.insert(0, BENCH)
import gen_image  # noqa: E402

WORK = "/work/bench-tmp/retention"
VDI = "1e2d3c4b-5a69-4788-9a6b-5c4d3e2f1a0b"


def run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def du(path):
    return int(run("du", "-sb", "--apparent-size", path).stdout.split()[0]), int(run("du", "-sB1", path).stdout.split()[0])


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(*argv):
    t = time.monotonic()
    p = run(*argv)
    return time.monotonic() - t, p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    a = ap.parse_args()
    tool, cbtfs = os.path.join(a.build, "src", "cbtfs-repo"), os.path.join(a.build, "src", "cbtfs")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    repo, img, mnt = f"{WORK}/repo", f"{WORK}/disk.img", f"{WORK}/mnt"
    os.makedirs(mnt)
    run(tool, "init", repo)
    gen_image.base(img, a.size_mib, 7)
    t0 = datetime.datetime(2026, 10, 1, tzinfo=datetime.timezone.utc)
    build_start = time.monotonic()
    for i in range(a.points):
        if i:
            gen_image.delta(img, 1, 1000 + i)
        when = (t0 + datetime.timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        run(tool, "import", "-q", "--vdi", VDI, "--time", when, repo, img)
    build_s = time.monotonic() - build_start
    apparent0, used0 = du(repo)

    prune_s, p = timed(tool, "prune", "--keep-last", "24", "--keep-daily", "7", repo, VDI)
    apparent1, used1 = du(repo)
    left = len(run(tool, "ls", "--json", repo).stdout.split('"path"')) - 1
    verify_s, _ = timed(tool, "verify", repo)

    drop_caches()
    restore_s, _ = timed(tool, "restore", repo, VDI, "latest", f"{WORK}/restored.img")
    assert subprocess.run(["cmp", img, f"{WORK}/restored.img"]).returncode == 0, "restore differs"
    m = subprocess.Popen([cbtfs, "-f", repo, mnt], stderr=subprocess.PIPE)
    while not os.path.ismount(mnt):
        time.sleep(0.02)
    try:
        drop_caches()
        # restore fsyncs what it wrote before it says done: cp gets the same.
        cp_s, _ = timed("sh", "-c", f"cp --sparse=always {mnt}/{VDI}/latest.raw {WORK}/copied.img && sync {WORK}/copied.img")
    finally:
        run("fusermount3", "-u", mnt)
        m.wait()
    assert subprocess.run(["cmp", img, f"{WORK}/copied.img"]).returncode == 0, "cp differs"
    size = a.size_mib << 20

    mb = 1e6
    print(f"## Retention and restore, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"Machine: {os.cpu_count()} cores; {os.uname().release}. Disk {a.size_mib} MiB (40 % random, 30 % text,"
          f" 30 % zero), {a.points} points an hour apart, 1 % of the blocks rewritten per point"
          f" (chain built in {build_s:.0f} s).\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| repository before prune (used on disk) | {used0 / mb:.0f} MB |")
    print(f"| `prune --keep-last 24 --keep-daily 7` | {prune_s:.2f} s, {a.points - left} points removed, {left} kept |")
    print(f"| space given back | {(used0 - used1) / mb:.0f} MB ({100 * (used0 - used1) / used0:.0f} %) |")
    print(f"| repository after prune (used; apparent {apparent1 / mb:.0f} MB) | {used1 / mb:.0f} MB |")
    print(f"| verify after prune | {verify_s:.2f} s, OK |")
    print(f"| `cbtfs-repo restore` of the newest point to a file | {restore_s:.2f} s, {size / restore_s / mb:.0f} MB/s |")
    print(f"| `cp --sparse=always` from the mount, then `sync` of the copy | {cp_s:.2f} s, {size / cp_s / mb:.0f} MB/s |")
    print(f"| restore / cp speed | {cp_s / restore_s:.2f}x |")
    print("\nprune said: " + p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
