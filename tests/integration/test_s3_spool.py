"""A writer's memory on S3 does not grow with the pack (issue 12 item 9):
parts grow with the pack to stay within S3's part limit, and parts larger
than the first ones wait for their upload in unlinked files of the spool
directory, not in memory. Against the real RGW.

Terabytes are not uploaded: the test knobs CBTFS_S3_PART_SIZE and
CBTFS_S3_MAX_PARTS shrink the first part to 5 MiB (RGW's smallest) and the
part limit to a few parts, so that a pack of a few hundred MiB makes parts
grow as a pack of terabytes does.
Runs with CBTFS_TEST_BACKEND=s3."""

import os
import subprocess

import pytest

import conftest
from conftest import BACKEND, REPO_TOOL, _s3_split, files_equal, ls_json, repo_tool, run, unfinished_uploads

assert BACKEND == "s3", "run with CBTFS_TEST_BACKEND=s3"

VDI = "6f7a8b9c-0d1e-4f2a-8b3c-4d5e6f7a8b9c"
MiB = 1 << 20
PART = 5 * MiB   # the first parts: RGW refuses smaller ones
MAX_PARTS = 10   # parts then grow by PART each: 5, 10, ... 50 MiB, 275 MiB in all


def random_image(path, mib):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return str(path)


def knobs(**extra):
    env = dict(os.environ, CBTFS_S3_PART_SIZE=str(PART), CBTFS_S3_MAX_PARTS=str(MAX_PARTS))
    env.update(extra)
    return env


def import_cmd(repo, img, time_iso):
    return [REPO_TOOL, "import", "-q", "--vdi", VDI, "--time", time_iso, str(repo), img]


def peak_rss_mib(cmd, env):
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    return int(p.stderr.strip().splitlines()[-1]) // 1024


@pytest.fixture
def repo(tmp_path):
    """Format 1: the tests count the parts of the VDI's one pack."""
    r = conftest.new_repo_location(tmp_path)
    run(REPO_TOOL, "init", "--format", "1", r)
    return r


def pack_parts(repo):
    """Parts of the one pack of VDI, from its ETag ("md5-N" after a multipart upload)."""
    client = conftest._rgw.client()
    bucket, packs = _s3_split(repo, f"vdis/{VDI}/packs/")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=packs).get("Contents", [])]
    assert len(keys) == 1, keys
    etag = client.head_object(Bucket=bucket, Key=keys[0])["ETag"].strip('"')
    return int(etag.split("-")[1]) if "-" in etag else 1


def committed_points(repo):
    return [p for v in ls_json(repo)["vdis"] for p in v["points"]]


def test_parts_grow_and_memory_does_not(tmp_path, repo):
    # 240 MiB of random data: parts of 5, 10, ... 50 MiB. Kept in memory
    # (the writer before the spool), a filling part and four in flight took
    # 219 MiB; spooled, memory holds only the 5 MiB first part (25 MiB).
    # Main's parts of 16 MiB alone, five of them, would pass the bound.
    img = random_image(tmp_path / "disk.img", 240)
    mib = peak_rss_mib(import_cmd(repo, img, "2026-11-20T03:00:00Z"), knobs())
    print(f"peak RSS of a 240 MiB import in parts growing to 50 MiB: {mib} MiB")
    parts = pack_parts(repo)
    assert parts == MAX_PARTS, f"{parts} parts: they did not grow as planned"
    assert mib < 64, f"peak RSS {mib} MiB: parts are held in memory"
    assert repo_tool("verify", repo).returncode == 0
    restored = tmp_path / "restored.img"
    repo_tool("restore", repo, VDI, "latest", restored)
    assert files_equal(restored, img)


def test_a_pack_beyond_the_part_limit_is_refused_cleanly(tmp_path, repo):
    # A pack that S3 cannot hold in its parts fails with a message that says
    # so, before it sends a part S3 would refuse; nothing is left behind.
    img = random_image(tmp_path / "disk.img", 300)  # more than the 275 MiB that 10 parts hold
    p = subprocess.run(import_cmd(repo, img, "2026-11-20T03:00:00Z"), capture_output=True, text=True, env=knobs())
    assert p.returncode != 0, "a pack beyond the part limit was committed"
    assert "parts" in p.stderr and "too large" in p.stderr, p.stderr
    assert committed_points(repo) == []
    assert unfinished_uploads(repo) == []


@pytest.fixture
def small_spool(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", d)
    yield str(d)
    run("umount", d, check=False)


def test_a_full_spool_directory_is_a_clear_error(tmp_path, repo, small_spool):
    # 12 MiB of spool: the 10 MiB part fits, the 15 MiB one does not.
    img = random_image(tmp_path / "disk.img", 240)
    p = subprocess.run(import_cmd(repo, img, "2026-11-20T03:00:00Z"), capture_output=True, text=True,
                       env=knobs(CBTFS_S3_SPOOL_DIR=small_spool))
    assert p.returncode != 0, "the import passed with a spool directory too small for its parts"
    assert small_spool in p.stderr and "CBTFS_S3_SPOOL_DIR" in p.stderr, p.stderr
    assert "No space left" in p.stderr, p.stderr
    assert committed_points(repo) == []
    assert unfinished_uploads(repo) == []
    assert os.statvfs(small_spool).f_bfree == os.statvfs(small_spool).f_blocks, "spool files left behind"
    # With room to spool, the same import passes.
    subprocess.run(import_cmd(repo, img, "2026-11-20T03:00:00Z"), check=True, env=knobs())
    assert [p["path"].split("/")[1] for p in committed_points(repo)] == ["2026-11-20T030000Z.raw"]
    assert repo_tool("verify", repo).returncode == 0
    restored = tmp_path / "restored.img"
    repo_tool("restore", repo, VDI, "latest", restored)
    assert files_equal(restored, img)
