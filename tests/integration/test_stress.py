"""Stress: 8 readers stream and random-read points through the mount while
new points are imported and old ones pruned. Every byte read is checked;
no error is allowed; the daemon's memory stays bounded."""

import os
import random
import shutil
import threading
import time

from conftest import BLOCK, Mount, repo_tool, write_at

VDI = "0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d"
SECONDS = float(os.environ.get("CBTFS_STRESS_SECONDS", "15"))
BLOCKS = 256  # 16 MiB disk
# Sanitizer builds carry shadow memory; CI raises the limit for them.
RSS_LIMIT_MIB = int(os.environ.get("CBTFS_RSS_LIMIT_MIB", "100"))


def test_readers_while_importing_and_pruning(tmp_path, repo, mnt):
    rnd = random.Random(5)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(rnd.randbytes(BLOCKS * BLOCK))
    states = {}  # image name -> bytes
    lock = threading.Lock()
    counter = [0]

    def commit_point():
        i = counter[0]
        counter[0] += 1
        t = time.gmtime(1790000000 + i * 60)
        name = time.strftime("%Y-%m-%dT%H%M%SZ.raw", t)
        repo_tool("import", "-q", "--vdi", VDI, "--time", time.strftime("%Y-%m-%dT%H:%M:%SZ", t), repo, img)
        with lock:
            states[name] = open(img, "rb").read()
        return name

    commit_point()
    stop = threading.Event()
    errors, verified = [], [0]

    def reader(seed):
        r = random.Random(seed)
        while not stop.is_set():
            with lock:
                newest = sorted(states)[-2:]  # prune keeps 5: these stay while we read
            name = r.choice(newest)
            want = states[name]
            try:
                with open(os.path.join(mnt, VDI, name), "rb") as f:
                    if r.random() < 0.3:
                        data = f.read()
                        ok = data == want
                        n = len(data)
                    else:
                        ok, n = True, 0
                        for _ in range(50):
                            off = r.randrange(0, len(want) - 4096)
                            f.seek(off)
                            piece = f.read(4096)
                            ok = ok and piece == want[off:off + 4096]
                            n += len(piece)
                if not ok:
                    errors.append(f"wrong data in {name}")
                with lock:
                    verified[0] += n
            except OSError as e:
                errors.append(f"{name}: {e}")

    with Mount(repo, mnt) as m:
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + SECONDS
        rounds = 0
        while time.monotonic() < deadline and not errors:
            for _ in range(4):
                write_at(img, rnd.randrange(BLOCKS) * BLOCK, rnd.randbytes(BLOCK))
            commit_point()
            rounds += 1
            if rounds % 3 == 0:
                repo_tool("prune", "--keep-last", "5", repo)
                with lock:
                    for old in sorted(states)[:-5]:
                        del states[old]
        stop.set()
        for t in threads:
            t.join()
        rss = int(next(l.split()[1] for l in open(f"/proc/{m.proc.pid}/status") if l.startswith("VmRSS")))
    assert not errors, errors[:5]
    assert rounds >= 5
    assert verified[0] > 100 * BLOCK
    assert rss < RSS_LIMIT_MIB * 1024, f"daemon RSS {rss} KiB"
    assert repo_tool("verify", repo).returncode == 0
    print(f"stress: {SECONDS:.0f} s, {rounds} imports, {verified[0] / 2**20:.0f} MiB verified, RSS {rss / 1024:.1f} MiB")
