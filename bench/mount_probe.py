#!/usr/bin/python3
"""Mounts REPO with cbtfs, times how long until an image of VDI is readable,
reads PROBES random 4 KiB pieces, and prints mount time and daemon RSS.

  mount_probe.py CBTFS REPO MNT VDI [PROBES]

ready_s runs from starting cbtfs to having read the first 4 KiB of
MNT/VDI/latest.raw. rss_mib is the daemon's resident memory after the
random reads, hwm_mib its peak. The file system is unmounted however the
probe ends. run.py imports probe() from here.
"""
import os
import random
import subprocess
import sys
import time


def probe(cbtfs, repo, mnt, vdi, probes=100, deadline_s=30.0, log=None):
    t0 = time.monotonic()
    p = subprocess.Popen([cbtfs, "-f", repo, mnt], stdout=log, stderr=log)
    mounted = False
    try:
        while not os.path.ismount(mnt):
            if p.poll() is not None:
                raise RuntimeError(f"cbtfs exited with status {p.returncode} before mounting {mnt}")
            if time.monotonic() - t0 > deadline_s:
                raise RuntimeError(f"cbtfs did not mount {mnt} within {deadline_s} s")
            time.sleep(0.001)
        mounted = True
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
        status = {l.split(":")[0]: l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("Vm")}
        points = len(os.listdir(os.path.join(mnt, vdi))) - 1  # less latest.raw
        return {"points": points, "size": size, "ready_s": ready, "probes": probes,
                "rss_mib": int(status["VmRSS"]) / 1024, "hwm_mib": int(status["VmHWM"]) / 1024}
    finally:
        if mounted or os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", mnt], check=False)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    r = probe(*sys.argv[1:5], probes=int(sys.argv[5]) if len(sys.argv) > 5 else 100)
    print(f"points={r['points']} size={r['size']} ready_s={r['ready_s']:.3f} "
          f"rss_mib={r['rss_mib']:.1f} hwm_mib={r['hwm_mib']:.1f} after {r['probes']} random reads")
