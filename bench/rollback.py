#!/usr/bin/python3
"""rollback --xapi against restore --xapi --no-sparse, in the XAPI simulator: a
4 GiB VDI holding 1 GiB of data, backed up (POINT), 1.5% of its blocks then
changed and backed up again, 0.5% more changed by the guest after that (2% in
all since POINT); the VM halted. Prints, for each, the time, the bytes of
request body the host took in, and whether the VDI equals POINT.

CBTFS_BUILD=build-rb /usr/bin/python3 bench/rollback.py [WORKDIR]"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from conftest import BLOCK, REPO_TOOL, run    # noqa: E402
from test_ingest import INGEST               # noqa: E402
from xapi import Sim                         # noqa: E402

SIZE = 4 << 30
DATA = 1 << 30


def scribble(path, blocks, rnd):
    """Writes into the disk file as a guest would; CBT sees it through the snapshot's digests."""
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cbtfs-rollback-bench")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = str(work / "repo")
    run(REPO_TOOL, "init", repo)
    sim = Sim(work, [{"name": "vm", "disks": [{"name": "d", "size": SIZE}]}])
    try:
        disk = sim.disks_of("vm")[0]
        uuid, path = disk["uuid"], disk["path"]
        rnd = random.Random(3)
        with open(path, "r+b") as f:
            for off in range(0, DATA, 64 << 20):
                f.seek(off)
                f.write(rnd.randbytes(64 << 20))
        ingest = [INGEST, "--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file,
                  "--vdi", uuid, repo]
        run(*ingest)
        point_img = work / "point.img"
        shutil.copyfile(path, point_img)
        nblocks = SIZE // BLOCK
        changed = rnd.sample(range(nblocks), int(nblocks * 0.02))
        scribble(path, changed[:int(len(changed) * 0.75)], rnd)
        run(*ingest)
        scribble(path, changed[int(len(changed) * 0.75):], rnd)
        vm = next(v["uuid"] for v in sim.state()["vms"] if v["name"] == "vm")
        sim.post("/power_state", {"vm": vm, "state": "Halted"})
        point = json.loads(run(REPO_TOOL, "ls", "--json", repo).stdout)["vdis"][0]["points"][0]["time"]
        print(f"4 GiB VDI, 1 GiB data, {len(changed)} blocks ({100 * len(changed) / nblocks:.1f}%) changed since POINT")

        proxy, session = sim.xapi()
        sr = proxy.SR.get_uuid(session, proxy.SR.get_by_name_label(session, "Local storage")["Value"][0])["Value"]
        xapi = ["--xapi", sim.url, "--password-file", sim.password_file, "--ca-file", sim.ca_file]
        sim.post("/reset_counters", {})
        start = time.monotonic()
        p = run(REPO_TOOL, "rollback", *xapi, repo, uuid, point)
        seconds = time.monotonic() - start
        same = subprocess.run(["cmp", "-s", path, str(point_img)]).returncode == 0
        (rec,) = sim.get("/imports")["imports"]
        print(f"rollback              {seconds:6.1f} s  body {rec['body_bytes']:>11} B  identical {same}")
        print("  " + p.stdout.strip().replace("\n", "\n  "))

        sim.post("/reset_counters", {})
        start = time.monotonic()
        p = run(REPO_TOOL, "restore", *xapi, "--sr", sr, "--no-sparse", repo, uuid, point)
        seconds = time.monotonic() - start
        new = sim.vdi(p.stdout.strip())
        same = subprocess.run(["cmp", "-s", new["path"], str(point_img)]).returncode == 0
        (rec,) = sim.get("/imports")["imports"]
        print(f"restore --no-sparse   {seconds:6.1f} s  body {rec['body_bytes']:>11} B  identical {same}")
        os.unlink(new["path"])
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
