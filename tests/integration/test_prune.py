"""Prune on a real repository: while mounted and read, and killed at many moments."""

import os
import random
import signal
import subprocess
import threading
import time

from conftest import BACKEND, BLOCK, REPO_TOOL, Mount, files_equal, ls_json, repo_tool, write_at

VDI = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"


def build_chain(tmp_path, repo, n, size_blocks=64):
    """n points, each rewriting a few blocks; returns {image name: state file}."""
    rnd = random.Random(11)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(rnd.randbytes(size_blocks * BLOCK))
    states = {}
    for i in range(n):
        if i:
            for _ in range(3):
                write_at(img, rnd.randrange(size_blocks) * BLOCK, rnd.randbytes(BLOCK))
        day, hour = divmod(i, 24)
        t = f"2026-10-{1 + day:02d}T{hour:02d}:00:00Z"
        repo_tool("import", "-q", "--vdi", VDI, "--time", t, repo, img)
        state = tmp_path / f"state{i}.img"
        with open(img, "rb") as src, open(state, "wb") as dst:
            dst.write(src.read())
        states[f"2026-10-{1 + day:02d}T{hour:02d}0000Z.raw"] = state
    return states


def check_remaining(repo, mnt, states):
    names = [p["path"].split("/")[1] for p in ls_json(repo)["vdis"][0]["points"]]
    assert repo_tool("verify", repo).returncode == 0
    with Mount(repo, mnt) as m:
        for n in names:
            assert files_equal(m.path(VDI, n), states[n]), n
    return names


def test_prune_while_mounted_and_read(tmp_path, repo, mnt):
    # On S3, where each import costs requests, a day's chain: the same
    # prune under the same reader, of fewer points.
    n = 14 if BACKEND == "s3" else 30
    states = build_chain(tmp_path, repo, n)
    newest = sorted(states)[-1]
    errors, reads = [], [0]
    with Mount(repo, mnt) as m:
        stop = threading.Event()

        def reader():
            want = open(states[newest], "rb").read()
            while not stop.is_set():
                try:
                    with open(m.path(VDI, newest), "rb") as f:
                        if f.read() != want:
                            errors.append("wrong data")
                    reads[0] += 1
                except OSError as e:
                    errors.append(str(e))

        th = threading.Thread(target=reader)
        th.start()
        time.sleep(0.2)
        out = repo_tool("prune", "--keep-last", "3", "--keep-daily", "2", repo).stdout
        time.sleep(0.2)
        stop.set()
        th.join()
        assert not errors, errors
        assert reads[0] > 0
        # the last three, and the newest of each of the last two days
        want = (["2026-10-01T110000Z.raw", "2026-10-01T120000Z.raw", "2026-10-01T130000Z.raw"] if n == 14 else
                ["2026-10-01T230000Z.raw", "2026-10-02T030000Z.raw", "2026-10-02T040000Z.raw",
                 "2026-10-02T050000Z.raw"])
        assert f"removed {n - len(want)} point(s)" in out, out
        deadline = time.monotonic() + 5
        while len(os.listdir(m.path(VDI))) != len(want) + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        listing = sorted(os.listdir(m.path(VDI)))
    kept = check_remaining(repo, mnt, states)
    assert listing == sorted(kept + ["latest.raw"])
    assert kept == want, kept


def test_kill_9_during_prune(tmp_path, repo, mnt):
    # A third of the chain on S3, where each import and verify costs
    # requests: the same eight kill moments, over fewer points.
    n = 20 if BACKEND == "s3" else 60
    states = build_chain(tmp_path, repo, n)
    t0 = time.monotonic()
    dry = repo_tool("prune", "--dry-run", "--keep-last", "5", repo)
    assert f"would remove {n - 5} point(s)" in dry.stdout
    budget = max(0.05, time.monotonic() - t0)
    killed = 0
    for i in range(8):
        keep = (2 * n // 3) - (n // 15) * i  # 40, 36, ... 12 of 60
        p = subprocess.Popen([REPO_TOOL, "prune", "--keep-last", str(keep), str(repo)], stdout=subprocess.DEVNULL)
        time.sleep(budget * i / 8)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed += p.returncode == -signal.SIGKILL
        v = repo_tool("verify", repo, check=False)
        assert v.returncode == 0, v.stdout + v.stderr
    assert killed >= 1
    repo_tool("prune", "--keep-last", "5", repo)
    kept = check_remaining(repo, mnt, states)
    assert kept == sorted(states)[-5:]
    # every pack left is needed by a remaining point
    v = repo_tool("verify", repo)
    assert "warning" not in v.stderr
