#!/usr/bin/python3
"""Mounts REPO with cbtfs, times how long until an image of VDI is readable,
reads PROBES random 4 KiB pieces, and prints mount time and daemon RSS.

  mount_probe.py CBTFS REPO MNT VDI [PROBES]
"""
import os
import random
import subprocess
import sys
import time

cbtfs, repo, mnt, vdi = sys.argv[1:5]
probes = int(sys.argv[5]) if len(sys.argv) > 5 else 100
t0 = time.monotonic()
p = subprocess.Popen([cbtfs, "-f", repo, mnt])
while not os.path.ismount(mnt):
    if p.poll() is not None:
        sys.exit("cbtfs died")
    time.sleep(0.002)
img = os.path.join(mnt, vdi, "latest.raw")
with open(img, "rb") as f:
    f.read(4096)
ready = time.monotonic() - t0
size = os.path.getsize(img)
rnd = random.Random(1)
with open(img, "rb") as f:
    for _ in range(probes):
        f.seek(rnd.randrange(0, size - 4096))
        f.read(4096)
rss = int(next(l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")))
points = len(os.listdir(os.path.join(mnt, vdi))) - 1
subprocess.run(["fusermount3", "-u", mnt], check=True)
p.wait()
print(f"points={points} size={size} ready_s={ready:.3f} rss_mib={rss / 1024:.1f} after {probes} random reads")
