"""The S3 writer lock, its release and its fencing, cleanup of abandoned
uploads, a writer's memory, and the daemonized mount, against the real RGW.
A fault proxy (tests/s3/fault_proxy.py) stands between one command and the
gateway where a test needs a refused request or a stalled one.
Runs with CBTFS_TEST_BACKEND=s3."""

import concurrent.futures
import ctypes
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import conftest
from conftest import (image, BACKEND, BLOCK, CBTFS, LEASE_SECONDS, REPO_TOOL, _s3_split, files_equal, get_object,
                      list_objects, ls_json, repo_tool, run)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "s3"))
from fault_proxy import Answer, FaultProxy, Hold  # noqa: E402

assert BACKEND == "s3", "run with CBTFS_TEST_BACKEND=s3"

VDI = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"


def start_import(repo, img, time_iso, endpoint=None):
    env = dict(os.environ)
    if endpoint:
        env["CBTFS_S3_ENDPOINT"] = endpoint
    return subprocess.Popen([REPO_TOOL, "import", "-q", "--vdi", VDI, "--time", time_iso, str(repo), img],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def lock_body(repo):
    try:
        return get_object(repo, f"vdis/{VDI}/lock").decode()
    except Exception:
        return ""


def wait_for(cond, what, proc=None, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def uploads(repo):
    bucket, prefix = _s3_split(repo, "")
    pages = conftest._rgw.client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
    return [u for page in pages for u in page.get("Uploads", [])]


def test_release_never_removes_the_next_holders_lock(tmp_path, repo):
    # Issue 12 item 8. A writer whose lock rewrites fail cannot tell whether
    # it still holds the lock: it must count it as lost, and its release
    # must not remove the lock another writer took over meanwhile.
    base = image(tmp_path / "base.img", 64, 1)
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-20T03:00:00Z", repo, base)
    big = image(tmp_path / "big.img", 2048, 2)
    with FaultProxy(os.environ["CBTFS_S3_ENDPOINT"]) as proxy:
        refused = threading.Event()

        def refuse_rewrites(req):  # taking a released lock passes; A's refreshes fail
            if req.is_lock_rewrite() and lock_body(repo) != "\nreleased\n":
                refused.set()
                return Answer(403, "AccessDenied")
            return None

        proxy.rules.append(refuse_rewrites)
        a = start_import(repo, big, "2026-11-21T03:00:00Z", proxy.endpoint)
        b = None
        try:
            wait_for(refused.is_set, "A's first refresh", a)
            a.send_signal(signal.SIGSTOP)
            time.sleep(LEASE_SECONDS + 1.5)
            b = start_import(repo, big, "2026-11-22T03:00:00Z")
            wait_for(lambda: f"pid {b.pid} " in lock_body(repo), "B to take the lock over", b)
            b.send_signal(signal.SIGSTOP)  # B holds the lock while A ends
            a.send_signal(signal.SIGCONT)
            out, err = a.communicate(timeout=120)
            assert f"pid {b.pid} " in lock_body(repo), "A's release removed B's lock"
            assert a.returncode != 0, "A's lock rewrites failed: it must not commit"
            assert "lost the lock" in err, err
        finally:
            a.send_signal(signal.SIGCONT)
            if b is not None:
                b.send_signal(signal.SIGCONT)
        out, err = b.communicate(timeout=120)
        assert b.returncode == 0, err
    assert not lock_body(repo).split("\n")[0], "a released lock names nobody"
    points = ls_json(repo)["vdis"][0]["points"]
    assert [p["path"].split("/")[1] for p in points] == ["2026-11-20T030000Z.raw", "2026-11-22T030000Z.raw"]
    assert repo_tool("verify", repo).returncode == 0
    # A released lock is free at once, with no lease to wait for.
    p = repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-23T03:00:00Z", repo, base)
    assert "took over" not in p.stderr, p.stderr


def test_a_writer_stalled_in_its_manifest_put_commits_nothing(tmp_path, repo):
    # Issue 12 item 7. The manifest PUT is held by a slow gateway while its
    # writer is stopped past its lease; another writer takes the lock over,
    # cleans up and writes. The held PUT must not land: the stalled writer's
    # request deadline ended with its lease, and it gave up.
    base = image(tmp_path / "base.img", 64, 1)
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-20T03:00:00Z", repo, base)
    small = image(tmp_path / "small.img", 64, 3)
    big = image(tmp_path / "big.img", 4096, 4)  # 256 MiB: B is still uploading when A's PUT is let go
    release, stopped = threading.Event(), threading.Event()
    a = None

    def stop_writer():
        a.send_signal(signal.SIGSTOP)
        stopped.set()

    with FaultProxy(os.environ["CBTFS_S3_ENDPOINT"]) as proxy:
        proxy.rules.append(lambda req: Hold(release, stop_writer) if req.is_manifest_put() else None)
        a = start_import(repo, small, "2026-11-21T03:00:00Z", proxy.endpoint)
        b = None
        try:
            wait_for(stopped.is_set, "A's manifest PUT", a)
            time.sleep(LEASE_SECONDS + 1.5)
            b = start_import(repo, big, "2026-11-22T03:00:00Z")
            wait_for(lambda: any("/packs/" in u["Key"] for u in uploads(repo)), "B's upload", b)
            a.send_signal(signal.SIGCONT)
            time.sleep(1)  # A notices that its deadline has passed
            release.set()
            out, err = a.communicate(timeout=60)
        finally:
            release.set()
            a.send_signal(signal.SIGCONT)
        out_b, err_b = b.communicate(timeout=120)
    assert a.returncode != 0, "A stalled past its lease: it must not commit"
    assert b.returncode == 0, err_b
    points = ls_json(repo)["vdis"][0]["points"]
    assert [p["path"].split("/")[1] for p in points] == ["2026-11-20T030000Z.raw", "2026-11-22T030000Z.raw"]
    assert repo_tool("verify", repo, check=False).returncode == 0
    assert "lease" in err, err
    assert ("PUT", "dropped") in [(m, s) for m, k, q, s, r in proxy.log if "/points/" in k], proxy.log
    restored = tmp_path / "restored.img"
    repo_tool("restore", repo, VDI, "latest", restored)
    assert files_equal(restored, big)


def test_prune_aborts_abandoned_uploads_past_the_first_page(tmp_path, repo):
    # Issue 12 item 11. Dead writers leave multipart uploads; a listing
    # gives 1000 at most, and prune must abort them too.
    img = image(tmp_path / "a.img", 16, 5)
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-20T03:00:00Z", repo, img)
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-21T03:00:00Z", repo, img)
    bucket, packs = _s3_split(repo, f"vdis/{VDI}/packs/")
    client = conftest._rgw.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.create_multipart_upload(Bucket=bucket, Key=f"{packs}{90000000 + i}.pack"),
                      range(1010)))
    assert len(uploads(repo)) == 1010
    repo_tool("prune", "--keep-last", "1", repo, VDI)
    assert uploads(repo) == []
    assert repo_tool("verify", repo).returncode == 0


def peak_rss_kib(cmd, env=None):
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    return int(p.stderr.strip().splitlines()[-1])


def test_writer_memory_does_not_grow_with_the_pack(tmp_path, repo):
    # Issue 12 item 9: a 1 GiB incompressible full base; every part used to
    # stay in memory until the commit (RSS about the size of the pack).
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    kib = peak_rss_kib([REPO_TOOL, "import", "-q", "--vdi", VDI, "--time", "2026-11-20T03:00:00Z", str(repo),
                        str(img)])
    print(f"peak RSS of a 1 GiB import: {kib // 1024} MiB")
    assert kib < 256 * 1024, f"peak RSS {kib // 1024} MiB"
    restored = tmp_path / "restored.img"
    repo_tool("restore", repo, VDI, "latest", restored)
    assert files_equal(restored, img)


PR_SET_CHILD_SUBREAPER = 36


def daemon_pid(mnt):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"cbtfs" and str(mnt).encode() in argv:
            return int(pid)
    return None


def test_daemonized_mount_by_the_mount_helper(tmp_path, repo, mnt):
    # Issue 12 item 10: mount -t fuse.cbtfs (as from fstab: no environment,
    # the settings file named in the URL) forks into a daemon. Its cache
    # must read ahead in the daemon, and it must exit 0 at unmount.
    link = "/usr/local/bin/cbtfs"
    if os.path.exists(link) and os.path.realpath(link) != os.path.realpath(CBTFS):
        pytest.skip(f"{link} is another cbtfs; not replacing it")
    img = image(tmp_path / "disk.img", 4096, 6)  # 256 MiB
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-20T03:00:00Z", repo, img)
    libc = ctypes.CDLL(None, use_errno=True)
    made = not os.path.exists(link)
    with FaultProxy(os.environ["CBTFS_S3_ENDPOINT"]) as proxy:
        conf = tmp_path / "s3.conf"
        conf.write_text(f"endpoint = {proxy.endpoint}\naccess_key = {os.environ['AWS_ACCESS_KEY_ID']}\n"
                        f"secret_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n")
        conf.chmod(0o600)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # what a boot-time mount has
        # The daemon outlives mount.fuse3: as its subreaper, this process
        # learns how it exits.
        assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        if made:
            os.symlink(CBTFS, link)
        try:
            p = subprocess.run(["mount", "-t", "fuse.cbtfs", f"{repo}?config={conf}", str(mnt)], env=env,
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            assert os.path.ismount(mnt)
            pid = daemon_pid(mnt)
            assert pid, "no cbtfs daemon"
            with open(os.path.join(mnt, VDI, "latest.raw"), "rb") as f:
                f.read(32 << 20)
            time.sleep(2)
            # Chunks of 8 MiB fetched whole beyond what was read: readahead.
            ahead = set()
            for m, k, q, s, r in proxy.log:
                if m == "GET" and "/packs/" in k and r:
                    first, last = (int(x) for x in r.split("=")[1].split("-"))
                    if last - first + 1 == 8 << 20 and first >= 40 << 20:
                        ahead.add(first)
            assert len(ahead) >= 4, f"no readahead in the daemon: {sorted(ahead)}"
            run("umount", mnt)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"daemon ended with status {status:#x}"
        finally:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            if os.path.ismount(mnt):
                run("umount", "-l", mnt, check=False)
            if made:
                os.unlink(link)
