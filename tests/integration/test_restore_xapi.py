"""cbtfs-repo restore --xapi against the XAPI simulator: a sparse restore sends
the point's allocated blocks only (format=raw&chunked=true), --no-sparse every
byte; the new VDI is byte-identical either way; a failed import, a damaged
block or a redirect to nowhere leaves no VDI behind; a 302 to the host that
sees the SR is followed; the upload goes to the pool master after login was
sent there."""

import os
import random

import pytest

from conftest import BLOCK, REPO_TOOL, files_equal, flip_object_byte, import_image, pack_of_point, run
from xapi import Sim

MIB = 1 << 20
VDI = "5e1f0c9a-7d3b-4c21-9a57-0b8e6d2f4a11"
CHUNK_HEADER = 12
SIZE = 256 * MIB


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path, [{"name": "web01", "disks": [{"name": "system", "size": 4 * MIB}]}])
    yield s
    s.stop()


def scattered_image(path, size, seed, share=0.05):
    """A sparse disk with about `share` of it data: single 64 KiB blocks scattered
    all over, three runs of several MiB, and the last block. Returns the bytes of data."""
    rnd = random.Random(seed)
    nblocks = size // BLOCK
    blocks = set(rnd.sample(range(nblocks), int(nblocks * share * 0.6)))
    for _ in range(3):
        start = rnd.randrange(nblocks - 64)
        blocks.update(range(start, start + rnd.randrange(16, 64)))  # 1 to 4 MiB, across a chunk's end too
    blocks.add(nblocks - 1)
    with open(path, "wb") as f:
        f.truncate(size)
        for b in sorted(blocks):
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))
    return len(blocks) * BLOCK


def sr_uuid(sim):
    proxy, session = sim.xapi()
    sr = proxy.SR.get_by_name_label(session, "Local storage")["Value"][0]
    return proxy.SR.get_uuid(session, sr)["Value"]


def restore(sim, repo, *extra, url=None, sr=None, check=True):
    return run(REPO_TOOL, "restore", "--xapi", url or sim.url, "--password-file", sim.password_file,
               "--ca-file", sim.ca_file, "--sr", sr or sr_uuid(sim), *extra, repo, VDI, "latest", check=check)


def vdi_uuids(sim):
    return {v["uuid"] for v in sim.vdis()}


def imports(sim):
    return sim.get("/imports")["imports"]


@pytest.fixture
def point(tmp_path, repo):
    """A 256 MiB disk holding about 5% data, backed up; (image path, data bytes)."""
    img = tmp_path / "disk.img"
    data = scattered_image(img, SIZE, 11)
    import_image(repo, img, VDI, "2024-05-01T10:00:00Z", name="scattered")
    return str(img), data


def test_sparse_restore_sends_only_the_data(sim, repo, point):
    img, data = point
    assert 0.04 * SIZE < data < 0.06 * SIZE
    sim.post("/reset_counters", {})
    p = restore(sim, repo)
    new = sim.vdi(p.stdout.strip())
    assert new["virtual_size"] == SIZE
    assert files_equal(new["path"], img)
    (rec,) = imports(sim)
    assert (rec["chunked"], rec["outcome"], rec["data_bytes"]) == (True, "success", data)
    # Runs of blocks go together, cut at 4 MiB: fewer chunks than blocks.
    assert rec["chunks"] < data // BLOCK
    assert rec["body_bytes"] == data + CHUNK_HEADER * (rec["chunks"] + 1)
    assert rec["body_bytes"] <= 1.1 * data
    assert "14.1 MiB of data in 256.0 MiB" in p.stderr, p.stderr

    # --no-sparse: every byte, zeros too, into a VDI just as identical.
    sim.post("/reset_counters", {})
    p = restore(sim, repo, "--no-sparse")
    full = sim.vdi(p.stdout.strip())
    assert files_equal(full["path"], img)
    (rec,) = imports(sim)
    assert (rec["chunked"], rec["outcome"], rec["body_bytes"], rec["data_bytes"]) == (False, "success", SIZE, SIZE)
    assert "every byte sent" in p.stderr, p.stderr
    p = run(REPO_TOOL, "restore", "--no-sparse", repo, VDI, "latest", os.path.join(os.path.dirname(img), "x"),
            check=False)
    assert p.returncode == 2 and "--no-sparse goes with --xapi" in p.stderr, p.stderr


def test_an_empty_point_sends_only_the_last_chunk(sim, repo, tmp_path):
    img = tmp_path / "empty.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
    import_image(repo, img, VDI, "2024-05-01T10:00:00Z")
    sim.post("/reset_counters", {})
    new = sim.vdi(restore(sim, repo).stdout.strip())
    assert files_equal(new["path"], img)
    assert [(r["body_bytes"], r["chunks"], r["outcome"]) for r in imports(sim)] == [(CHUNK_HEADER, 0, "success")]


def test_failed_imports_leave_no_vdi(sim, repo, point):
    img, data = point
    before = vdi_uuids(sim)
    # The host's storage fails partway: HTTP 200 all the same, the task says it.
    sim.post("/import_fail", {"after_bytes": data // 2})
    p = restore(sim, repo, check=False)
    assert p.returncode != 0 and "VDI_IO_ERROR" in p.stderr, p.stderr
    assert vdi_uuids(sim) == before
    assert imports(sim)[-1]["outcome"] == "failure"
    assert not [t for t in sim.state()["tasks"] if t["status"] == "pending"]

    # A damaged block: the upload stops mid-stream (the host sees a stream
    # without its last chunk), the restore fails as damaged data, exit 1.
    pack = pack_of_point(repo, VDI)
    flip_object_byte(repo, pack, 5000)
    p = restore(sim, repo, check=False)
    assert p.returncode == 1 and "checksum" in p.stderr, p.stderr
    assert vdi_uuids(sim) == before
    assert imports(sim)[-1]["outcome"] in ("failure", "running")
    assert not [t for t in sim.state()["tasks"] if t["status"] == "pending"]
    flip_object_byte(repo, pack, 5000)       # repaired: it works again
    assert files_equal(sim.vdi(restore(sim, repo).stdout.strip())["path"], img)


def test_a_302_to_the_host_that_sees_the_sr_is_followed(sim, repo, point):
    img, data = point
    sim.post("/reset_counters", {})
    sim.post("/import_redirect", {})
    new = sim.vdi(restore(sim, repo).stdout.strip())
    assert files_equal(new["path"], img)
    (first, second) = imports(sim)
    assert (first["host"], first["outcome"], first["body_bytes"]) == ("master", "redirected", 0)
    assert first["redirected_to"].startswith(sim.member + "/import_raw_vdi?")
    assert "chunked=true" in first["redirected_to"] and "task_id=" in first["redirected_to"]
    assert (second["host"], second["outcome"], second["data_bytes"]) == ("member", "success", data)
    assert second["task"] == first["task"]

    # A redirect to a host that does not answer, and one that goes round in
    # circles: the restore fails and the new VDI goes.
    before = vdi_uuids(sim)
    sim.post("/import_redirect", {"to": "https://127.0.0.1:1"})
    p = restore(sim, repo, check=False)
    assert p.returncode != 0 and "upload to https://127.0.0.1:1 failed" in p.stderr, p.stderr
    sim.post("/import_redirect", {"to": sim.url, "count": 50})
    p = restore(sim, repo, check=False)
    assert p.returncode != 0 and "redirected more than 5 times" in p.stderr, p.stderr
    assert vdi_uuids(sim) == before
    assert not [t for t in sim.state()["tasks"] if t["status"] == "pending"]
    sim.post("/import_redirect", {"to": sim.url.replace("https:", "http:")})
    p = restore(sim, repo, check=False)
    assert p.returncode != 0 and "which is not HTTPS" in p.stderr, p.stderr
    assert vdi_uuids(sim) == before


def test_the_upload_goes_to_the_pool_master(sim, repo, point):
    img, _ = point
    port = sim.url.rsplit(":", 1)[1]
    sr = sr_uuid(sim)
    sim.post("/fail", {"method": "session.login_with_password", "error": ["HOST_IS_SLAVE", "127.0.0.1"], "count": 1})
    sim.post("/reset_counters", {})
    new = sim.vdi(restore(sim, repo, url=f"https://localhost:{port}", sr=sr).stdout.strip())
    assert files_equal(new["path"], img)
    assert [r["http_host"] for r in imports(sim)] == [f"127.0.0.1:{port}"]


def test_a_point_of_an_encrypted_repository_restores_to_a_new_vdi(sim, tmp_path, monkeypatch):
    """The repository's passphrase and XAPI's password each from a root-only
    file: the new VDI is the point's plaintext, and neither secret is printed."""
    from conftest import new_repo_location, repo_tool, root_only_file

    phrase = "the restore operator's passphrase 7f3a"
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(root_only_file(tmp_path / "passphrase", phrase + "\n")))
    repo = new_repo_location(tmp_path, "enc")
    repo_tool("init", "--encryption", "passphrase", repo)
    img = tmp_path / "disk.img"
    data = scattered_image(img, 64 * MIB, 12)
    import_image(repo, img, VDI, "2024-05-01T10:00:00Z", name="scattered")
    sim.post("/reset_counters", {})
    p = restore(sim, repo)
    assert files_equal(sim.vdi(p.stdout.strip())["path"], img)
    (rec,) = imports(sim)
    assert (rec["outcome"], rec["data_bytes"]) == ("success", data)
    assert phrase not in p.stdout + p.stderr

    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    before = vdi_uuids(sim)
    p = restore(sim, repo, check=False)
    assert p.returncode == 7 and "encrypted" in p.stderr, p.stderr
    assert vdi_uuids(sim) == before  # nothing made before the key was found missing
