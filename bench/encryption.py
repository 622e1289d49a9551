#!/usr/bin/python3
"""Encrypted against plain format 2 repositories, one run, side by side:
the same image imported into each, then read through the mount
(sequential 1 MiB reads, random 4 KiB reads) and restored to a file,
alternating between the two, median of the rounds. The full ingest
against nbdcopy on an encrypted repository is bench/run.py --cases 7
--format 2 --encryption passphrase.

    sudo /usr/bin/python3 bench/encryption.py [--image-mib 1024] [--rounds 3] [--encryption passphrase]
                                              [--cipher aes-256-ocb|aes-256-gcm]

Uses the binaries in build/src; needs root (mounts). Every read is the
first after a fresh mount, with the repositories' files warm in the host
page cache (as bench/run.py), and is checked against the source image.
The random reads have both repositories mounted at once: one readbench
rand2 reads 1000 offsets from one mount, the same 1000 from the other,
and so on for 20000 (which goes first alternates), so that this shared
machine's swings fall on both sides alike.
Restores go to /dev/shm when it has room for two images (the disk's
writeback is noisier than what is measured), and the restore is also
given less what opening the repository costs (an encrypted one's scrypt,
about half a second, paid once per command whatever its size). With
--encryption keyfile the encrypted repository is opened by a key file, as
an unattended job would, and pays no scrypt."""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
BIN = os.path.join(ROOT, "build", "src")
MIB = 1 << 20
VDI = "0e0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a02"


def run(*args, env=None):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, env=env).stdout


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def readbench(tool, mode, path, bs, count=0, seed=1):
    out = run(tool, mode, path, bs, *([count, seed] if mode == "rand" else []))
    r = dict(kv.split("=") for kv in out.split())
    return {"bytes": int(r["bytes"]), "ops": int(r["ops"]), "secs": float(r["secs"]), "hash": r["hash"]}


def warm(path):
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(8 * MIB):
                    pass


class Mount:
    def __init__(self, repo, env, mnt, other=False):
        mnt = mnt + "-2" if other else mnt
        os.makedirs(mnt, exist_ok=True)
        self.mnt = mnt
        self.proc = subprocess.Popen([os.path.join(BIN, "cbtfs"), "-f", repo, mnt], env=env,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("cbtfs did not mount " + repo)
            time.sleep(0.02)

    def __enter__(self):
        return os.path.join(self.mnt, VDI, "latest.raw")

    def __exit__(self, *exc):
        subprocess.run(["fusermount3", "-u", self.mnt], check=True)
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--encryption", choices=("passphrase", "keyfile"), default="passphrase")
    ap.add_argument("--cipher", choices=("aes-256-ocb", "aes-256-gcm"), default="aes-256-ocb")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cbtfs-encryption-", dir="/var/tmp")
    restore_dir = work
    try:
        tool = os.path.join(work, "readbench")
        run("gcc", "-O3", "-march=native", "-Wall", "-o", tool, os.path.join(BENCH, "readbench.c"))
        image = os.path.join(work, "disk.img")
        run("/usr/bin/python3", os.path.join(BENCH, "gen_image.py"), "base", image, a.image_mib)
        plain_env = {k: v for k, v in os.environ.items() if not k.startswith("CBTFS_")}
        secret = os.path.join(work, "secret")
        with open(secret, "wb") as f:
            f.write(b"bench passphrase\n" if a.encryption == "passphrase" else os.urandom(32))
        enc_env = dict(plain_env, **{"CBTFS_PASSPHRASE_FILE" if a.encryption == "passphrase" else "CBTFS_KEY_FILE": secret})
        repos = {"plain": (os.path.join(work, "plain"), plain_env), "encrypted": (os.path.join(work, "enc"), enc_env)}
        repo_tool = os.path.join(BIN, "cbtfs-repo")
        run(repo_tool, "init", repos["plain"][0])
        run(repo_tool, "init", "--encryption", a.encryption, "--cipher", a.cipher, repos["encrypted"][0], env=enc_env)
        want_seq = readbench(tool, "seq", image, MIB)["hash"]
        # Random reads come in chunks of 1000 offsets, each chunk read from
        # both mounts one after the other: this shared machine's swings then
        # fall on both sides alike.
        want_rand = readbench(tool, "rand", image, 4096, 20000)["hash"]
        res = {k: {"import": [], "seq": [], "rand": [], "restore": [], "restore_data": [], "open": []} for k in repos}
        for name, (repo, env) in repos.items():
            t = time.monotonic()
            run(repo_tool, "import", "-q", "--vdi", VDI, "--time", "2026-11-30T010000Z", repo, image, env=env)
            res[name]["import"].append(a.image_mib * MIB / (time.monotonic() - t) / 1e6)
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        # Restores go to memory when it has room: writing gigabytes back to
        # this machine's disk takes seconds of kernel time that vary more
        # between runs than encryption costs.
        shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        restore_dir = tempfile.mkdtemp(dir="/dev/shm") if shm > 2 * a.image_mib * MIB else work
        for r in range(a.rounds):
            for name in repos:
                warm(repos[name][0])
            with Mount(*repos["plain"], mnt, other=True) as plain_path, Mount(*repos["encrypted"], mnt) as enc_path:
                order = ["plain", "encrypted"] if r % 2 == 0 else ["encrypted", "plain"]
                paths = {"plain": plain_path, "encrypted": enc_path}
                out = run(tool, "rand2", paths[order[0]], paths[order[1]], 4096, 20000, 1, 1000).splitlines()
                for name, line in zip(order, out):
                    s = dict(kv.split("=") for kv in line.split())
                    assert s["hash"] == want_rand, f"{name}: wrong data in the random reads"
                    res[name]["rand"].append(int(s["ops"]) / float(s["secs"]))
            for name in (["plain", "encrypted"] if r % 2 == 0 else ["encrypted", "plain"]):
                repo, env = repos[name]
                warm(repo)
                with Mount(repo, env, mnt) as path:
                    s = readbench(tool, "seq", path, MIB)
                    assert s["hash"] == want_seq, f"{name}: wrong data in the sequential read"
                    res[name]["seq"].append(s["bytes"] / s["secs"] / 1e6)
                # What opening the repository costs every command (scrypt, for
                # an encrypted one), apart from the restore's own work.
                t = time.monotonic()
                run(repo_tool, "ls", repo, env=env)
                opening = time.monotonic() - t
                res[name]["open"].append(opening * 1000)
                out = os.path.join(restore_dir, "restored.img")
                t = time.monotonic()
                run(repo_tool, "restore", "--force", repo, VDI, "latest", out, env=env)
                took = time.monotonic() - t
                res[name]["restore"].append(a.image_mib * MIB / took / 1e6)
                res[name]["restore_data"].append(a.image_mib * MIB / (took - opening) / 1e6)
                with open(out, "rb") as f1, open(image, "rb") as f2:
                    assert hashlib.sha256(f1.read()).digest() == hashlib.sha256(f2.read()).digest(), "restore"
                os.unlink(out)
        rows = [("import of the image (one process, page cache)", "import", "MB/s", None),
                ("sequential 1 MiB reads through the mount", "seq", "MB/s", 0.85),
                ("random 4 KiB reads through the mount, 20000 offsets, both mounts in turn", "rand", "reads/s", 0.9),
                ("cbtfs-repo restore to a file", "restore", "MB/s", 0.85),
                ("the same, less what opening the repository costs (ls)", "restore_data", "MB/s", 0.85),
                ("opening the repository (cbtfs-repo ls)", "open", "ms", None)]
        print(f"{a.image_mib} MiB image (bench/gen_image.py base), {a.cipher}, unlocked by a {a.encryption}, "
              f"median of {a.rounds} rounds, restored to "
              f"{'memory (/dev/shm)' if restore_dir != work else 'disk'}; "
              f"load average {os.getloadavg()[0]:.2f} at the end\n")
        print("| measure | unit | encrypted | plain | encrypted/plain | target |")
        print("|---|---|---:|---:|---:|---|")
        for what, key, unit, target in rows:
            e, p = median(res["encrypted"][key]), median(res["plain"][key])
            met = "" if target is None else f"≥ {target} {'met' if e / p >= target else '**missed**'}"
            print(f"| {what} | {unit} | {e:.0f} | {p:.0f} | {e / p:.3f} | {met} |")
    finally:
        for m in ("mnt", "mnt-2"):
            subprocess.run(["fusermount3", "-u", "-z", os.path.join(work, m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        if restore_dir != work:
            shutil.rmtree(restore_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
