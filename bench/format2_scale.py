#!/usr/bin/python3
"""Format 2 at scale, one run each, printed as a Markdown table:

  gc     100 VDIs x 30 points (1 MiB disks, 2 blocks rewritten per point),
         then prune --keep-last 9 (70 % of the points) with its collection:
         time on a local repository and on S3 (the same points copied there
         with cbtfs-repo copy), and on S3 the bytes the bucket gave back
         against the bytes the collection found dead.
  index  peak RSS and MB/s of cbtfs-repo import of a 1 GiB image of new
         blocks into a repository whose dedup index holds 20 M synthetic
         entries (bench/fill_index.cpp), in one merged segment (as a
         collection leaves it) and in 2000 per-pack segments; against the
         same import into an empty repository.
  copy   cbtfs-repo copy of an incremental point (5 % of a 1 GiB disk,
         random blocks) to S3: bytes the bucket grew by against the new
         blocks' bytes.

    sudo /usr/bin/python3 bench/format2_scale.py [--parts gc,index,copy] [--vdis 100] [--points 30]

Uses build/src and build/bench; S3 parts start a Ceph RADOS Gateway
(tests/s3/rgw.py) as bench/s3.py does."""

import argparse
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
REPO_TOOL = os.path.join(ROOT, "build", "src", "cbtfs-repo")
FILL = os.path.join(ROOT, "build", "bench", "fill-index")
WORK = "/work/bench-tmp/format2-scale"
MIB = 1 << 20
BLOCK = 65536


def run(*args, env=None):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{args} failed: {p.stdout}\n{p.stderr}")
    return p.stdout


def timed(*args, env=None):
    t = time.monotonic()
    out = run(*args, env=env)
    return time.monotonic() - t, out


def max_rss_mib(*args):
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *[str(a) for a in args]], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{args} failed: {p.stderr}")
    return int(p.stderr.strip().splitlines()[-1]) / 1024


def du(path):
    return sum(os.stat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(path) for f in fs)


def load_rgw():
    spec = importlib.util.spec_from_file_location("cbtfs_test_rgw", os.path.join(ROOT, "tests", "s3", "rgw.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Rgw


class S3:
    def __init__(self):
        self.rgw = load_rgw()(os.path.join(WORK, "rgw"))
        self.rgw.start()
        self.rgw.make_bucket("bench")
        self.env = dict(os.environ, CBTFS_S3_ENDPOINT=self.rgw.endpoint, AWS_REGION=self.rgw.region,
                        AWS_ACCESS_KEY_ID=self.rgw.access_key, AWS_SECRET_ACCESS_KEY=self.rgw.secret_key)
        self.client = self.rgw.client()

    def bytes(self, prefix):
        total = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def upload_tree(self, root, prefix):
        from concurrent.futures import ThreadPoolExecutor
        files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs
                 if f != "lock" and not f.startswith(".tmp")]
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda p: self.client.upload_file(p, "bench", prefix + "/" + os.path.relpath(p, root)), files))

    def stop(self):
        self.rgw.stop()


def gc_part(rows, s3, vdis, points):
    rnd = random.Random(1)
    repo = os.path.join(WORK, "gc-local")
    run(REPO_TOOL, "init", repo)
    img = os.path.join(WORK, "small.img")
    t = time.monotonic()
    for v in range(vdis):
        vdi = str(uuid.UUID(int=v + 1))
        data = bytearray(rnd.randbytes(MIB))
        for k in range(points):
            for _ in range(2):
                b = rnd.randrange(MIB // BLOCK)
                data[b * BLOCK:(b + 1) * BLOCK] = rnd.randbytes(BLOCK)
            with open(img, "wb") as f:
                f.write(data)
            run(REPO_TOOL, "import", "-q", "--vdi", vdi, "--time", f"2026-10-{1 + k // 24:02d}T{k % 24:02d}0000Z",
                repo, img)
    print(f"built {vdis} x {points} points in {time.monotonic() - t:.0f} s", file=sys.stderr)
    if s3:
        # The same objects uploaded as they are (a repository's keys are its
        # files' paths on both backends); a copy would pack every VDI's
        # records together, as one nightly ingest of them all does.
        s3_repo = "s3://bench/gc"
        t = time.monotonic()
        s3.upload_tree(repo, "gc")
        print(f"uploaded to S3 in {time.monotonic() - t:.0f} s", file=sys.stderr)
    before = du(repo)
    secs, out = timed(REPO_TOOL, "prune", "--keep-last", str(points * 3 // 10), repo)
    print(out.splitlines()[-1], file=sys.stderr)
    rows.append((f"prune 70 % of {vdis} VDIs x {points} points, with its collection, local", f"{secs:.1f} s",
                 "target < 30 s", f"{(before - du(repo)) / MIB:.0f} MiB given back"))
    secs, _ = timed(REPO_TOOL, "gc", repo)
    rows.append(("a collection with nothing to free (marks every point), local", f"{secs:.1f} s", "", ""))
    if s3:
        before = s3.bytes("gc/")
        secs, out = timed(REPO_TOOL, "prune", "--keep-last", str(points * 3 // 10), s3_repo, env=s3.env)
        last = out.splitlines()[-1]
        print(last, file=sys.stderr)
        given = before - s3.bytes("gc/")
        dead = given
        m = re.search(r"\(([\d.]+) (\w+) no longer needed", last)
        if m:
            dead += float(m[1]) * {"B": 1, "KiB": 1 << 10, "MiB": MIB, "GiB": 1 << 30}[m[2]]
        rows.append((f"prune 70 % of {vdis} VDIs x {points} points, with its collection, S3", f"{secs:.1f} s",
                     "target < 120 s", ""))
        rows.append(("S3 bytes given back / dead bytes", f"{given / dead:.2f}" if dead else "n/a", "target >= 0.9",
                     f"{given / MIB:.1f} of {dead / MIB:.1f} MiB"))


def index_part(rows, entries_total):
    img = os.path.join(WORK, "new.img")
    with open(img, "wb") as f:
        rnd = random.Random(3)
        for _ in range(1024):
            f.write(rnd.randbytes(MIB))
    results = {}
    m = entries_total // 1_000_000
    for name, entries, segments in (("empty", 0, 0), (f"{m} M entries, 1 merged segment", entries_total, 1),
                                    (f"{m} M entries, 2000 segments", entries_total, 2000)):
        repo = os.path.join(WORK, "index-" + str(segments))
        shutil.rmtree(repo, ignore_errors=True)
        run(REPO_TOOL, "init", repo)
        if entries:
            run(FILL, repo, entries, segments)
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
        t = time.monotonic()
        rss = max_rss_mib(REPO_TOOL, "import", "-q", "--vdi", str(uuid.UUID(int=7)), "--time", "2026-11-01T000000Z",
                          repo, img)
        results[name] = (rss, 1024 * MIB / (time.monotonic() - t) / 1e6)
        shutil.rmtree(repo)
    e = results["empty"]
    for name, (rss, rate) in results.items():
        rows.append((f"import of 1 GiB of new blocks, index: {name}", f"{rss:.0f} MiB peak RSS, {rate:.0f} MB/s",
                     "target <= 256 MiB" if name != "empty" else "",
                     f"{rate / e[1]:.2f} x the empty repository's MB/s"))


def copy_part(rows, s3):
    src = os.path.join(WORK, "copy-src")
    run(REPO_TOOL, "init", src)
    img = os.path.join(WORK, "copy.img")
    rnd = random.Random(4)
    with open(img, "wb") as f:
        for _ in range(1024):
            f.write(rnd.randbytes(MIB))
    vdi = str(uuid.UUID(int=9))
    run(REPO_TOOL, "import", "-q", "--vdi", vdi, "--time", "2026-11-01T000000Z", src, img)
    dst = "s3://bench/copy"
    run(REPO_TOOL, "init", dst, env=s3.env)
    run(REPO_TOOL, "copy", "-q", src, dst, env=s3.env)
    blocks = set(rnd.sample(range(1024 * MIB // BLOCK), 1024 * MIB // BLOCK // 20))
    with open(img, "r+b") as f:
        for b in sorted(blocks):
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))
    run(REPO_TOOL, "import", "-q", "--vdi", vdi, "--time", "2026-11-02T000000Z", src, img)
    before = s3.bytes("copy/")
    secs, _ = timed(REPO_TOOL, "copy", "-q", src, dst, env=s3.env)
    grown = s3.bytes("copy/") - before
    new = len(blocks) * BLOCK
    rows.append(("copy of a 5 % incremental point to S3: bytes stored / new blocks' bytes", f"{grown / new:.3f}",
                 "target <= 1.1", f"{grown / MIB:.1f} MiB for {new / MIB:.1f} MiB, {secs:.1f} s"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="gc,index,copy")
    ap.add_argument("--vdis", type=int, default=100)
    ap.add_argument("--points", type=int, default=30)
    ap.add_argument("--entries", type=int, default=20_000_000, help="synthetic dedup index entries")
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()
    parts = a.parts.split(",")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    s3 = None if a.no_s3 or not ({"gc", "copy"} & set(parts)) else S3()
    rows = []
    try:
        if "gc" in parts:
            gc_part(rows, s3, a.vdis, a.points)
        if "index" in parts:
            index_part(rows, a.entries)
        if "copy" in parts and s3:
            copy_part(rows, s3)
    finally:
        if s3:
            s3.stop()
        shutil.rmtree(WORK, ignore_errors=True)
    print("| measure | cbtfs | target | note |\n|---|---:|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
