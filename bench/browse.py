#!/usr/bin/python3
"""cbtfs-browse figures, one run each (root):

  sudo /usr/bin/python3 bench/browse.py [--build build] [--work /var/tmp/cbtfs-bench-browse]

A 1 TiB sparse GPT disk with three file systems (ext4 1 GiB, XFS 4 GiB
holding a 1 GiB file, ext4 on the rest), imported twice: cleanly unmounted,
and copied while mounted right after an fsync in each (dirty journals).
Prints the time until cbtfs-browse returns (everything mounted) for each,
so the difference is the journal replay, and the cold read of the 1 GiB
file through cbtfs-browse against a read-only loop mount of a local copy of
the same image. Caches are dropped before each cold read."""

import argparse
import os
import shutil
import subprocess
import sys
import time

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
VDI = "9c8b7a6f-5e4d-4c3b-8a29-1f0e0d0c0b0a"


def sh(*a, **kw):
    return subprocess.run([str(x) for x in a], check=True, capture_output=True, text=True, **kw).stdout


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(path):
    t = time.monotonic()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                break
            n += len(b)
    return n / (time.monotonic() - t) / 1e6


def parts(img):
    out = []
    for n in (1, 2, 3):
        info = sh("sgdisk", f"-i{n}", img)
        first = int(info.split("First sector: ")[1].split()[0])
        last = int(info.split("Last sector: ")[1].split()[0])
        out.append((first * 512, (last - first + 1) * 512))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(os.path.dirname(__file__), "..", "build"))
    ap.add_argument("--work", default="/var/tmp/cbtfs-bench-browse")
    a = ap.parse_args()
    src = os.path.abspath(os.path.join(a.build, "src"))
    browse, repo_tool = f"{src}/cbtfs-browse", f"{src}/cbtfs-repo"
    w = a.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    img = f"{w}/disk.img"
    with open(img, "wb") as f:
        f.truncate(TIB)
    sh("sgdisk", "-n1:2048:+1G", "-n2:0:+4G", "-n3:0:0", img)
    loops, mnts = [], []
    try:
        for i, ((off, size), fs) in enumerate(zip(parts(img), ("ext4", "xfs", "ext4"))):
            dev = sh("losetup", "--find", "--show", "--offset", off, "--sizelimit", size, img).strip()
            loops.append(dev)
            if fs == "ext4":
                sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
            else:
                sh("mkfs.xfs", "-q", "-f", "-K", dev)
            m = f"{w}/guest{i + 1}"
            os.makedirs(m)
            sh("mount", "-o", "noinit_itable" if fs == "ext4" else "defaults", dev, m)
            mnts.append(m)
        with open(f"{mnts[1]}/big.bin", "wb") as f:
            for _ in range(GIB // (4 * MIB)):
                f.write(os.urandom(4 * MIB))
        for m in mnts:
            with open(f"{m}/small.txt", "w") as f:
                f.write("hello\n")
        sh("sync")
        for m in mnts:  # one more fsync'd file each, then the copy: dirty journals
            fd = os.open(f"{m}/fsynced.txt", os.O_CREAT | os.O_WRONLY)
            os.write(fd, b"fsync'd\n")
            os.fsync(fd)
            os.close(fd)
        sh("cp", "--sparse=always", img, f"{w}/dirty.img")
    finally:
        for m in mnts:
            subprocess.run(["umount", m])
        for l in loops:
            subprocess.run(["losetup", "-d", l])
    repo = f"{w}/repo"
    sh(repo_tool, "init", repo)
    sh(repo_tool, "import", "-q", "--vdi", VDI, "--time", "2026-11-24T03:00:00Z", repo, img)
    sh(repo_tool, "import", "-q", "--vdi", VDI, "--time", "2026-11-25T03:00:00Z", repo, f"{w}/dirty.img")
    view = f"{w}/view"
    os.makedirs(view)
    print(f"disk: 1 TiB sparse, {os.stat(img).st_blocks * 512 / GIB:.2f} GiB allocated; "
          "ext4 1 GiB, XFS 4 GiB, ext4 1019 GiB")
    try:
        for point, what in (("2026-11-24T030000Z", "clean (no replay)"), ("2026-11-25T030000Z", "dirty journals")):
            drop_caches()
            t = time.monotonic()
            out = sh(browse, repo, VDI, point, view)
            ready = time.monotonic() - t
            assert out.count(f"{view}/part") == 3, out
            assert os.path.exists(f"{view}/part3/fsynced.txt")
            t = time.monotonic()
            sh(browse, "-u", view)
            print(f"browse ready, {what}: {ready:.2f} s (undo {time.monotonic() - t:.2f} s)")
        sh(browse, repo, VDI, "2026-11-24T030000Z", view)
        try:
            drop_caches()
            cold = read_all(f"{view}/part2/big.bin")
            warm = read_all(f"{view}/part2/big.bin")
        finally:
            sh(browse, "-u", view)
        off, size = parts(img)[1]
        local = f"{w}/local"
        os.makedirs(local)
        sh("mount", "-o", f"loop,ro,offset={off},sizelimit={size}", img, local)
        try:
            drop_caches()
            lcold = read_all(f"{local}/big.bin")
            lwarm = read_all(f"{local}/big.bin")
        finally:
            sh("umount", local)
        print(f"1 GiB file, cold: cbtfs-browse {cold:.0f} MB/s, loop mount of a local copy {lcold:.0f} MB/s, "
              f"ratio {cold / lcold:.2f}")
        print(f"1 GiB file, warm: cbtfs-browse {warm:.0f} MB/s, loop mount of a local copy {lwarm:.0f} MB/s")
    finally:
        subprocess.run([browse, "-u", view], capture_output=True)
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
