#!/usr/bin/python3
"""Format 2 against format 1, one run: 20 clones of a template (2 % unique
writes each) imported into a repository of each format (bytes stored, and
against one clone alone), and a sequential read of one clone's image
through the mount, page cache dropped before each read.

    sudo /usr/bin/python3 bench/format2.py [--template-mib 512] [--clones 20] [--writes random]

--writes like-template (the default) makes each clone's own writes the same
mix as the template (half random, half text, compressible alike);
--writes random makes them all incompressible, the worst case for the
ratio against one clone: half the template compresses to almost nothing.

Uses the binaries in build/src; needs root (mount, drop_caches)."""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "build", "src")
BLOCK = 65536
MIB = 1 << 20


def run(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def read_through_mount(repo, vdi, work):
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen([os.path.join(BIN, "cbtfs"), "-f", repo, mnt], stderr=subprocess.DEVNULL)
    try:
        while not os.path.ismount(mnt):
            time.sleep(0.02)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        path = os.path.join(mnt, vdi, "latest.raw")
        t = time.monotonic()
        n = 0
        with open(path, "rb", buffering=0) as f:
            while True:
                b = f.read(MIB)
                if not b:
                    break
                n += len(b)
        return n / (time.monotonic() - t) / 1e6
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--template-mib", type=int, default=512)
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--writes", choices=["like-template", "random"], default="like-template")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cbtfs-format2-", dir="/var/tmp")
    try:
        size = a.template_mib * MIB
        rnd = random.Random(1)
        template = os.path.join(work, "template.img")
        with open(template, "wb") as f:
            for i in range(size // BLOCK):  # half random, half text: compressible like a real disk
                text = ((b"cbtfs template line %08d\n" % i) * (BLOCK // 28 + 1))[:BLOCK]
                f.write(rnd.randbytes(BLOCK) if i % 2 else text)
        vdis = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(a.clones)]
        unique = size // BLOCK // 50
        repos = {}
        for fmt in ("1", "2"):
            repo = os.path.join(work, f"repo{fmt}")
            run(os.path.join(BIN, "cbtfs-repo"), "init", "--format", fmt, repo)
            repos[fmt] = repo
        one = {}
        img = os.path.join(work, "clone.img")
        for n, vdi in enumerate(vdis):
            shutil.copyfile(template, img)
            r = random.Random(100 + n)
            with open(img, "r+b") as f:
                for k in range(unique):
                    f.seek(r.randrange(size // BLOCK) * BLOCK)
                    if a.writes == "random" or k % 2:
                        f.write(r.randbytes(BLOCK))
                    else:
                        f.write(((b"clone %02d write %08d\n" % (n, k)) * (BLOCK // 24 + 1))[:BLOCK])
            for fmt, repo in repos.items():
                run(os.path.join(BIN, "cbtfs-repo"), "import", "-q", "--vdi", vdi, "--time", "2026-11-30T010000Z", repo, img)
                if n == 0:
                    one[fmt] = du(repo)
        sizes = {fmt: du(repo) for fmt, repo in repos.items()}
        # Alternating, three times each; the median (the machine is shared).
        runs = {fmt: [] for fmt in repos}
        for _ in range(3):
            for fmt, repo in repos.items():
                runs[fmt].append(read_through_mount(repo, vdis[-1], work))
        speed = {fmt: sorted(v)[1] for fmt, v in runs.items()}
        print(f"| measure | format 1 | format 2 | ratio 2/1 |")
        print(f"|---|---:|---:|---:|")
        print(f"| {a.clones} clones of a {a.template_mib} MiB template, 2 % unique each ({a.writes} writes): bytes stored | "
              f"{sizes['1']:,} | {sizes['2']:,} | {sizes['2'] / sizes['1']:.3f} |")
        print(f"| same, against one clone alone in its format | {sizes['1'] / one['1']:.2f}x | "
              f"{sizes['2'] / one['2']:.2f}x | |")
        print(f"| sequential read of one clone through the mount, cold, median of 3, MB/s | {speed['1']:.0f} | {speed['2']:.0f} | "
              f"{speed['2'] / speed['1']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
