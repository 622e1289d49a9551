"""What only a repository on S3 has: credentials and buckets that can be
wrong, and a writer lock that is a lease. Runs with CBTFS_TEST_BACKEND=s3."""

import os
import random
import signal
import subprocess
import time

from conftest import (image, BACKEND, BLOCK, BUCKET, LEASE_SECONDS, REPO_TOOL, Mount, files_equal, get_object,
                      list_objects, ls_json, repo_tool, run)

assert BACKEND == "s3", "run with CBTFS_TEST_BACKEND=s3"

VDI = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f"


def get_object_or_empty(repo, key):
    try:
        return get_object(repo, key)
    except Exception:
        return b""


def test_wrong_credentials_and_missing_bucket(repo):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="not-the-secret")
    p = subprocess.run([REPO_TOOL, "ls", str(repo)], capture_output=True, text=True, env=env)
    assert p.returncode == 3, p.stderr
    assert "HTTP 403" in p.stderr and "check the access key" in p.stderr, p.stderr
    assert "not-the-secret" not in p.stderr + p.stdout and secret not in p.stderr + p.stdout
    p = repo_tool("ls", f"s3://no-such-bucket-{os.getpid()}/x", check=False)
    assert p.returncode == 3 and "the bucket does not exist" in p.stderr, p.stderr
    p = repo_tool("ls", f"s3://{BUCKET}/x?secret_key=abc", check=False)
    assert p.returncode != 0 and "credentials do not belong in the repository URL" in p.stderr, p.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    p = subprocess.run([REPO_TOOL, "ls", str(repo)], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "no S3 credentials" in p.stderr, p.stderr


def test_settings_from_a_file(repo, tmp_path):
    conf = tmp_path / "s3.conf"
    conf.write_text("# test\n"
                    f"endpoint = {os.environ['CBTFS_S3_ENDPOINT']}\n"
                    f"access_key = {os.environ['AWS_ACCESS_KEY_ID']}\n"
                    f"secret_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CBTFS_S3_ENDPOINT")}
    env["CBTFS_S3_CONFIG"] = str(conf)
    p = subprocess.run([REPO_TOOL, "ls", "--json", str(repo)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr


def test_a_stalled_writer_loses_its_lease_and_commits_nothing(tmp_path, repo, mnt):
    base = image(tmp_path / "base.img", 256, 1)
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-20T03:00:00Z", repo, base)
    big = image(tmp_path / "big.img", 4096, 2)  # 256 MiB, incompressible
    slow = subprocess.Popen([REPO_TOOL, "import", "-q", "--vdi", VDI, "--time", "2026-11-21T03:00:00Z", repo, big],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    # The lock object outlives its holders (a released lock names nobody):
    # wait for this writer's name in it.
    while f"pid {slow.pid} ".encode() not in get_object_or_empty(repo, f"vdis/{VDI}/lock"):
        assert slow.poll() is None and time.monotonic() < deadline, slow.stderr.read()
        time.sleep(0.01)
    time.sleep(0.3)  # into its upload
    slow.send_signal(signal.SIGSTOP)
    try:
        # While the lease runs, the lock holds; once it has run out, another
        # writer takes the lock over and commits.
        p = repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-22T03:00:00Z", repo, base, check=False)
        assert p.returncode == 6 and "being written by another process" in p.stderr, p.stderr
        time.sleep(LEASE_SECONDS + 2)
        p = repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-22T03:00:00Z", repo, base, check=False)
        assert p.returncode == 0, p.stderr
        assert "took over the lock" in p.stderr, p.stderr
    finally:
        slow.send_signal(signal.SIGCONT)
    out, err = slow.communicate(timeout=120)
    assert slow.returncode != 0, "the stalled writer must not commit"
    assert "taken over" in err or "lost the lock" in err or "upload" in err, err
    points = ls_json(repo)["vdis"][0]["points"]
    assert [p["path"].split("/")[1] for p in points] == ["2026-11-20T030000Z.raw", "2026-11-22T030000Z.raw"]
    assert repo_tool("verify", repo).returncode == 0
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(VDI, "latest.raw"), base)
    # The stalled writer's upload is gone; the next writer finds a clean VDI.
    repo_tool("import", "-q", "--vdi", VDI, "--time", "2026-11-23T03:00:00Z", repo, big)
    assert repo_tool("verify", repo).returncode == 0
