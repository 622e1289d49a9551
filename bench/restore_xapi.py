#!/usr/bin/python3
"""restore --xapi into the XAPI simulator, sparse against --no-sparse: a 4 GiB
VDI holding about 5% data in scattered 64 KiB blocks. Prints, for each, the
time, the bytes of request body the host took in (chunk headers included)
and whether the new VDI equals the image.

CBTFS_BUILD=build-r /usr/bin/python3 bench/restore_xapi.py [WORKDIR]"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from conftest import REPO_TOOL, run          # noqa: E402
from test_restore_xapi import VDI, scattered_image  # noqa: E402
from xapi import Sim                         # noqa: E402

SIZE = 4 << 30


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cbtfs-restore-xapi-bench")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img = work / "disk.img"
    data = scattered_image(img, SIZE, 12, share=0.05 / 0.6)   # 60% of it is the scattered blocks
    repo = str(work / "repo")
    run(REPO_TOOL, "init", repo)
    run(REPO_TOOL, "import", "-q", "--vdi", VDI, "--time", "2024-05-01T10:00:00Z", repo, img)
    sim = Sim(work, [{"name": "x", "disks": [{"name": "d", "size": 1 << 20}]}])
    try:
        proxy, session = sim.xapi()
        sr = proxy.SR.get_uuid(session, proxy.SR.get_by_name_label(session, "Local storage")["Value"][0])["Value"]
        print(f"4 GiB VDI, {data} bytes allocated ({100 * data / SIZE:.1f}%)")
        for mode, extra in (("sparse", []), ("--no-sparse", ["--no-sparse"])):
            sim.post("/reset_counters", {})
            start = time.monotonic()
            p = run(REPO_TOOL, "restore", "--xapi", sim.url, "--password-file", sim.password_file,
                    "--ca-file", sim.ca_file, "--sr", sr, *extra, repo, VDI, "latest")
            seconds = time.monotonic() - start
            new = sim.vdi(p.stdout.strip())
            same = subprocess.run(["cmp", "-s", new["path"], str(img)]).returncode == 0
            (rec,) = sim.get("/imports")["imports"]
            print(f"{mode:12} {seconds:6.1f} s  body {rec['body_bytes']:>11} B  ({rec['body_bytes'] / data:.4f} x allocated)"
                  f"  chunks {rec['chunks']:>5}  identical {same}")
            os.unlink(new["path"])
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
