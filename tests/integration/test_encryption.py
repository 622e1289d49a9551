"""Encrypted repositories through the real commands: everything a user
does works with the passphrase or key file, nothing stored holds the disks'
bytes or the VM's names, and a missing or wrong key, or any stored object
altered, swapped or truncated, is a clear error, never data."""

import hashlib
import json
import os
import random
import re
import time

import pytest

from conftest import (BLOCK, CBTFS, CoreDumps, Mount, all_object_keys, files_equal, flip_object_byte, get_object,
                      import_image, ls_json, new_repo_location, put_object, remove_object, REPO_TOOL, repo_tool,
                      root_only_file, run)

MARKER = b"cbtfs-plaintext-marker-7f3a9c"
VM_NAME = "payroll-db-vm-7f3a9c"
VDI_NAME = "payroll-db-disk-7f3a9c"
VDI = "0e0e7d39-6f1a-4c2e-9a53-2f6d1c1e8a01"
EXIT_KEY = 7
EXIT_USAGE = 2


def guest_image(path, seed, nblocks=48):
    """Half text blocks full of MARKER (compressible, as a disk's files
    are), half random ones."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(nblocks):
            if i % 2:
                f.write(rnd.randbytes(BLOCK))
            else:
                line = MARKER + b" block %06d seed %d\n" % (i, seed)
                f.write((line * (BLOCK // len(line) + 1))[:BLOCK])
    return path


@pytest.fixture
def passphrase(tmp_path, monkeypatch):
    p = tmp_path / "passphrase"
    p.write_text("correct horse battery staple\n")
    p.chmod(0o600)
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(p))
    return p


@pytest.fixture
def enc_repo(tmp_path, passphrase):
    r = new_repo_location(tmp_path, "enc")
    out = repo_tool("init", "--encryption", "passphrase", r).stdout
    assert "encrypted" in out, out
    return r


def data_digest(repo):
    """A hash of every stored object but the key slots."""
    return {k: hashlib.sha256(get_object(repo, k)).hexdigest() for k in all_object_keys(repo) if not k.startswith("keys/")}


def stored_bytes(repo):
    return {k: get_object(repo, k) for k in all_object_keys(repo)}


def test_every_command_works_and_nothing_stored_is_plaintext(enc_repo, tmp_path):
    img1 = guest_image(tmp_path / "p1.img", 1)
    img2 = tmp_path / "p2.img"
    img2.write_bytes(open(img1, "rb").read())
    with open(img2, "r+b") as f:  # a second point with some blocks changed
        f.seek(4 * BLOCK)
        f.write(random.Random(9).randbytes(3 * BLOCK))
    import_image(enc_repo, img1, VDI, "2026-11-29T010000Z", vm=VM_NAME, name=VDI_NAME)
    import_image(enc_repo, img2, VDI, "2026-11-30T010000Z", vm=VM_NAME, name=VDI_NAME)

    (vdi,) = ls_json(enc_repo)["vdis"]
    assert vdi["vm_name"] == VM_NAME and vdi["name"] == VDI_NAME, vdi
    assert "encryption  AES-256-OCB, 1 key slot(s)" in repo_tool("info", enc_repo).stdout  # the default
    assert "verify OK" in repo_tool("verify", enc_repo).stdout
    with Mount(enc_repo, tmp_path / "mnt") as m:
        assert files_equal(m.path(VDI, "2026-11-29T010000Z.raw"), img1)
        assert files_equal(m.path(VDI, "2026-11-30T010000Z.raw"), img2)
    restored = tmp_path / "restored.img"
    repo_tool("restore", enc_repo, VDI, "2026-11-29T010000Z", restored)
    assert files_equal(restored, img1)

    stored = stored_bytes(enc_repo)
    assert any(k.startswith("store/packs/") for k in stored), sorted(stored)
    for key, data in stored.items():
        for secret in (MARKER, VM_NAME.encode(), VDI_NAME.encode(), b"2026-11-29T01", b"id_key"):
            assert secret not in data, (key, secret)
    # the records are not merely compressed: a text block of the image is
    # nowhere in the packs in any form LZ4 would leave readable
    assert not any(re.search(rb"block 0000\d\d seed", d) for d in stored.values())


@pytest.mark.same_on_every_backend
def test_a_key_file_opens_it_and_nothing_else_does(tmp_path, monkeypatch):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE", raising=False)
    r = new_repo_location(tmp_path, "kf")
    short = tmp_path / "short"
    short.write_bytes(b"123")
    bad = repo_tool("init", "--encryption", "keyfile", "--key-file", short, r, check=False)
    assert bad.returncode == 2 and "at least 32" in bad.stderr, bad.stderr
    repo_tool("init", "--encryption", "keyfile", "--key-file", key, r)
    img = guest_image(tmp_path / "d.img", 3)
    monkeypatch.setenv("CBTFS_KEY_FILE", str(key))
    import_image(r, img, VDI, "2026-11-30T010000Z")
    restored = tmp_path / "back.img"
    repo_tool("restore", r, VDI, "latest", restored)
    assert files_equal(restored, img)

    other = tmp_path / "other-key"
    other.write_bytes(os.urandom(32))
    monkeypatch.setenv("CBTFS_KEY_FILE", str(other))
    wrong = repo_tool("ls", r, check=False)
    assert wrong.returncode == EXIT_KEY and "opens none of its key slots" in wrong.stderr, wrong.stderr
    monkeypatch.delenv("CBTFS_KEY_FILE")
    none = repo_tool("ls", r, check=False)
    assert none.returncode == EXIT_KEY and "is encrypted" in none.stderr, none.stderr


@pytest.mark.same_on_every_backend
def test_a_wrong_or_missing_passphrase_is_a_clear_error_for_every_command(enc_repo, tmp_path, monkeypatch):
    img = guest_image(tmp_path / "d.img", 4)
    import_image(enc_repo, img, VDI, "2026-11-30T010000Z")
    wrong = tmp_path / "wrong"
    wrong.write_text("Correct horse battery staple\n")
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(wrong))
    for args in (["ls", enc_repo], ["verify", enc_repo], ["restore", enc_repo, VDI, "latest", tmp_path / "x.img"],
                 ["import", "-q", "--vdi", VDI, enc_repo, img]):
        p = repo_tool(*args, check=False)
        assert p.returncode == EXIT_KEY, (args, p.returncode, p.stderr)
        assert "opens none of its key slots" in p.stderr, p.stderr
        assert "Correct horse" not in p.stderr + p.stdout
    assert not os.path.exists(tmp_path / "x.img")
    (tmp_path / "mnt").mkdir()
    m = run(CBTFS, "-f", enc_repo, tmp_path / "mnt", check=False)
    assert m.returncode == EXIT_KEY and "opens none of its key slots" in m.stderr, m.stderr
    # the mount option fstab uses gives the right one
    good = tmp_path / "good"
    good.write_text("correct horse battery staple\n")
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    with Mount(enc_repo, tmp_path / "mnt", "-o", f"passphrase_file={good}") as mnt:
        assert files_equal(mnt.path(VDI, "latest.raw"), img)


def test_altered_swapped_or_truncated_objects_are_errors_never_data(enc_repo, tmp_path):
    img1 = guest_image(tmp_path / "a.img", 5)
    img2 = guest_image(tmp_path / "b.img", 6)
    import_image(enc_repo, img1, VDI, "2026-11-29T010000Z")
    import_image(enc_repo, img2, VDI, "2026-11-30T010000Z")
    keys = all_object_keys(enc_repo)
    points = sorted(k for k in keys if k.startswith(f"vdis/{VDI}/points/"))
    assert len(points) == 2, keys
    p1, p2 = get_object(enc_repo, points[0]), get_object(enc_repo, points[1])

    # the two manifests swapped: each is bound to its own name
    put_object(enc_repo, points[0], p2)
    put_object(enc_repo, points[1], p1)
    ls = repo_tool("ls", enc_repo, check=False)
    assert ls.returncode == 1 and ls.stderr.count("does not open") == 2, (ls.returncode, ls.stderr)
    put_object(enc_repo, points[0], p1)
    put_object(enc_repo, points[1], p2)
    assert "verify OK" in repo_tool("verify", enc_repo).stdout

    # one byte in the middle of every pack altered (a record or an index
    # node of each point), then the packs truncated: EIO through the mount,
    # errors from verify and restore, never other bytes
    packs = sorted(k for k in keys if k.startswith("store/packs/") and k.endswith(".pack"))
    assert packs, keys
    pristine = {k: get_object(enc_repo, k) for k in packs}
    for k, data in pristine.items():
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        put_object(enc_repo, k, bytes(data))
    v = repo_tool("verify", enc_repo, check=False)
    assert v.returncode == 1, v.stdout + v.stderr
    for t in ("2026-11-29T010000Z", "2026-11-30T010000Z"):
        r = repo_tool("restore", "--force", enc_repo, VDI, t, tmp_path / "r.img", check=False)
        assert r.returncode == 1 and "damaged" in r.stderr, r.stderr
    with Mount(enc_repo, tmp_path / "mnt") as m:
        for t in ("2026-11-29T010000Z", "2026-11-30T010000Z"):
            with pytest.raises(OSError) as e:
                with open(m.path(VDI, t + ".raw"), "rb") as f:
                    while f.read(1 << 20):
                        pass
            assert e.value.errno == 5
    for k, data in pristine.items():
        put_object(enc_repo, k, data[:len(data) - 100])
    v = repo_tool("verify", enc_repo, check=False)
    assert v.returncode == 1, v.stdout + v.stderr


@pytest.mark.same_on_every_backend
def test_an_unattended_ingest_with_a_root_only_key_file_from_systemd_credentials(tmp_path, monkeypatch):
    """As cbtfs-ingest@.service runs it: the key file handed over by
    LoadCredential= ($CREDENTIALS_DIRECTORY), a full run, a guest write,
    an incremental run; both points read back through the mount."""
    from test_ingest import MIB, ingest
    from xapi import Sim

    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "cbtfs-key").write_bytes(os.urandom(32))
    (creds / "cbtfs-key").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    r = new_repo_location(tmp_path, "nightly")
    repo_tool("init", "--encryption", "keyfile", r)  # the credential is the first slot's key file
    sim = Sim(tmp_path, [{"name": VM_NAME, "disks": [{"name": VDI_NAME, "size": 4 * MIB}]}])
    try:
        (disk,) = sim.disks_of(VM_NAME)
        guest_image(disk["path"], 7, nblocks=64)
        ingest(sim, r, "--vm", VM_NAME)
        first = tmp_path / "first.img"
        first.write_bytes(open(disk["path"], "rb").read())
        with open(disk["path"], "r+b") as f:
            f.seek(10 * BLOCK)
            f.write(random.Random(11).randbytes(2 * BLOCK))
        out = ingest(sim, r, "--vm", VM_NAME, "--json").stdout
        (v,) = json.loads(out)["vdis"]
        assert v["ok"] and not v["full"], v
        with Mount(r, tmp_path / "mnt") as m:
            points = sorted(p for p in os.listdir(m.path(disk["uuid"])) if p.startswith("20"))
            assert len(points) == 2, points
            assert files_equal(m.path(disk["uuid"], points[0]), first)
            assert files_equal(m.path(disk["uuid"], points[1]), disk["path"])
    finally:
        sim.stop()
    for key in all_object_keys(r):
        data = get_object(r, key)
        assert MARKER not in data and VM_NAME.encode() not in data, key
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    p = repo_tool("ls", r, check=False)
    assert p.returncode == EXIT_KEY, p.stderr


def test_copy_makes_a_plain_repository_encrypted_and_back(enc_repo, tmp_path):
    plain = new_repo_location(tmp_path, "plain")
    repo_tool("init", plain)
    img = guest_image(tmp_path / "d.img", 8)
    import_image(plain, img, VDI, "2026-11-30T010000Z", vm=VM_NAME, name=VDI_NAME)
    assert any(MARKER in get_object(plain, k) for k in all_object_keys(plain))  # the control: plain is plain

    repo_tool("copy", plain, enc_repo)
    for key in all_object_keys(enc_repo):
        data = get_object(enc_repo, key)
        assert MARKER not in data and VM_NAME.encode() not in data, key
    (vdi,) = ls_json(enc_repo)["vdis"]
    assert vdi["vm_name"] == VM_NAME
    back = new_repo_location(tmp_path, "back")
    repo_tool("init", back)
    repo_tool("copy", enc_repo, back)
    restored = tmp_path / "restored.img"
    repo_tool("restore", back, VDI, "latest", restored)
    assert files_equal(restored, img)


@pytest.mark.same_on_every_backend
def test_a_mount_holding_the_key_leaves_no_core_dump_and_no_passphrase_in_argv(enc_repo, tmp_path, passphrase):
    import signal
    import subprocess
    import time

    img = guest_image(tmp_path / "d.img", 9)
    import_image(enc_repo, img, VDI, "2026-11-30T010000Z")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with CoreDumps(tmp_path / "cores") as dumps:
            p = subprocess.Popen([CBTFS, "-f", str(enc_repo), str(mnt)], preexec_fn=dumps.preexec,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not os.path.ismount(mnt):
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            assert files_equal(mnt / VDI / "latest.raw", img)  # the key is in use
            assert b"battery" not in open(f"/proc/{p.pid}/cmdline", "rb").read()
            p.send_signal(signal.SIGABRT)
            p.wait()
            left = dumps.cores(wait=0)  # a dumping process is reaped after its core is written
            assert all(b"battery staple" not in c.read_bytes() for c in left)
            assert not left, "the mount dumped core while holding the key"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.mark.same_on_every_backend
def test_key_slots_change_without_touching_the_data(enc_repo, tmp_path, monkeypatch):

    img = guest_image(tmp_path / "d.img", 10)
    import_image(enc_repo, img, VDI, "2026-11-30T010000Z")

    before = data_digest(enc_repo)
    (first,) = [l.split()[0] for l in repo_tool("key", "list", enc_repo).stdout.splitlines()]
    new_pass = tmp_path / "new-passphrase"
    new_pass.write_text("a second passphrase for the night shift\n")
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(48))
    out = repo_tool("key", "add", "--new-passphrase-file", new_pass, enc_repo).stdout
    second = re.search(r"added key slot ([0-9a-f]{16}) \(passphrase\)", out)[1]
    third = re.search(r"added key slot ([0-9a-f]{16})", repo_tool("key", "add", "--new-key-file", keyfile,
                                                                  enc_repo).stdout)[1]
    listed = repo_tool("key", "list", enc_repo).stdout
    assert {first, second, third} == {l.split()[0] for l in listed.splitlines()}, listed
    assert f"{first}  passphrase" in listed and "(opened this time)" in listed

    # the first passphrase goes: the repository is opened with the second
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(new_pass))
    assert "removed key slot " + first in repo_tool("key", "remove", enc_repo, first).stdout
    restored = tmp_path / "r.img"
    repo_tool("restore", enc_repo, VDI, "latest", restored)
    assert files_equal(restored, img)
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(tmp_path / "passphrase"))
    old = repo_tool("ls", enc_repo, check=False)
    assert old.returncode == EXIT_KEY, old.stderr
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    monkeypatch.setenv("CBTFS_KEY_FILE", str(keyfile))
    repo_tool("key", "remove", enc_repo, second)
    last = repo_tool("key", "remove", enc_repo, third, check=False)
    assert last.returncode == 2 and "last one" in last.stderr, last.stderr
    assert data_digest(enc_repo) == before  # no block, index or manifest was rewritten
    assert "verify OK" in repo_tool("verify", enc_repo).stdout


def test_a_header_replaced_by_a_plain_one_is_refused(enc_repo, tmp_path):
    """Whoever can write the bucket could swap in a plain header so that the
    next backups land in the clear: the key slots beside it give it away."""
    plain = new_repo_location(tmp_path, "plain")
    repo_tool("init", plain)
    put_object(enc_repo, "cbtfs-repository", get_object(plain, "cbtfs-repository"))
    img = guest_image(tmp_path / "d.img", 12)
    p = repo_tool("import", "-q", "--vdi", VDI, enc_repo, img, check=False)
    assert p.returncode == 3 and "altered or replaced" in p.stderr, p.stderr
    assert not any(k.startswith("store/packs/") for k in all_object_keys(enc_repo))


@pytest.mark.parametrize("encryption", ["passphrase", pytest.param("none", marks=pytest.mark.same_on_every_backend)])
def test_verify_without_the_key_checks_what_is_stored(tmp_path, monkeypatch, encryption):
    """An off-site admin holds the bucket but not the key: verify
    --stored-only checks every record, manifest and segment as stored, finds
    a flipped byte anywhere, and still does after a collection moved the
    records. Without --stored-only a missing key says how to do it."""
    pf = tmp_path / "passphrase"
    pf.write_text("correct horse battery staple\n")
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(pf))
    repo = new_repo_location(tmp_path, "r")
    repo_tool("init", "--format", "2", "--encryption", encryption, repo)
    img = guest_image(tmp_path / "d.img", 11)
    for i, t in enumerate(("2026-11-28T010000Z", "2026-11-29T010000Z", "2026-11-30T010000Z")):
        with open(img, "r+b") as f:  # a few blocks change each day
            for b in range(i, 48, 7):
                f.seek(b * BLOCK)
                f.write(random.Random(b * 31 + i).randbytes(BLOCK))
        import_image(repo, img, VDI, t)
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")

    if encryption != "none":
        v = repo_tool("verify", repo, check=False)
        assert v.returncode == EXIT_KEY and "verify --stored-only" in v.stderr, v.stderr
    ok = repo_tool("verify", "--stored-only", repo)
    assert "verify OK: 3 manifest(s)" in ok.stdout, ok.stdout
    records = int(re.search(r"(\d+) record\(s\)", ok.stdout).group(1))
    assert records >= 48, ok.stdout  # every data block and node of three points
    assert "not checked" not in ok.stdout, ok.stdout

    keys = all_object_keys(repo)
    packs = sorted(k for k in keys if k.startswith("store/packs/"))
    segments = sorted(k for k in keys if k.startswith("store/index/"))
    points = sorted(k for k in keys if k.startswith(f"vdis/{VDI}/points/"))
    for key in (packs[0], segments[0], points[1]):
        pristine = get_object(repo, key)
        flip_object_byte(repo, key, len(pristine) // 2)
        bad = repo_tool("verify", "--stored-only", repo, check=False)
        assert bad.returncode == 1 and "DAMAGED" in bad.stdout, (key, bad.stdout, bad.stderr)
        assert key.split("/")[-1] in bad.stdout, (key, bad.stdout)
        put_object(repo, key, pristine)

    if encryption != "none":
        # a manifest as the first encrypted repositories sealed it, the bare
        # seal without its frame: opened with the key, counted apart without
        framed = get_object(repo, points[2])
        assert framed.startswith(b"CBTFSSM1")
        put_object(repo, points[2], framed[8:-8])
        bare = repo_tool("verify", "--stored-only", repo)
        assert "verify OK" in bare.stdout and "1 manifest(s) have no stored checksum" in bare.stdout, bare.stdout
        assert "verify OK" in repo_tool("--passphrase-file", pf, "verify", repo).stdout
        put_object(repo, points[2], framed)

    # the oldest point pruned and collected: records moved into rewritten
    # packs, and the merged segment lists every record the rest need
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(pf))
    repo_tool("prune", "--keep-last", "2", repo)
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    after = repo_tool("verify", "--stored-only", repo)
    assert "verify OK: 2 manifest(s)" in after.stdout, after.stdout
    assert "not checked" not in after.stdout, after.stdout
    assert "no index segment lists" not in after.stderr, after.stderr


@pytest.mark.same_on_every_backend
def test_key_change_and_recovery_from_the_paper_key(enc_repo, tmp_path, monkeypatch):
    """The passphrase is changed, then every key slot is lost: the recovery
    key printed on paper (typed back with a typo first) makes a new way in,
    and no data object is rewritten on the way."""
    import subprocess

    img = guest_image(tmp_path / "d.img", 13)
    import_image(enc_repo, img, VDI, "2026-11-30T010000Z")

    before = data_digest(enc_repo)
    paper = repo_tool("key", "export", "--paper", enc_repo).stdout
    one_line = repo_tool("key", "export", enc_repo).stdout.strip()
    assert len(re.findall(r"^ ?\d: [0-9a-f]{4} [0-9a-f]{4} [0-9a-f]{4} [0-9a-f]{4}  [0-9a-f]{4}$", paper, re.M)) == 8, paper
    assert one_line.startswith("cbtfs-recovery-1:"), one_line

    new_pass = tmp_path / "new-passphrase"
    new_pass.write_text("the passphrase after the audit\n")
    out = repo_tool("key", "change", "--new-passphrase-file", new_pass, enc_repo).stdout
    assert "replaced by" in out, out
    assert repo_tool("ls", enc_repo, check=False).returncode == EXIT_KEY  # the old one opens nothing now
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(new_pass))
    assert len(repo_tool("key", "list", enc_repo).stdout.splitlines()) == 1

    for k in all_object_keys(enc_repo):  # every slot lost
        if k.startswith("keys/"):
            remove_object(enc_repo, k)
    lost = repo_tool("ls", enc_repo, check=False)
    assert lost.returncode != 0 and "key import" in lost.stderr, lost.stderr

    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))

    def key_import(text):
        return subprocess.run([REPO_TOOL, "key", "import", "--new-key-file", str(keyfile), str(enc_repo)],
                              input=text, capture_output=True, text=True)

    lines = paper.splitlines()
    typo = "\n".join(l.replace(l[4:8], "%04x" % (int(l[4:8], 16) ^ 1)) if l.startswith(" 3:") else l for l in lines)
    p = key_import(typo)
    assert p.returncode == 2 and "line 3: a typo" in p.stderr, p.stderr
    other = new_repo_location(tmp_path, "other")
    repo_tool("init", "--encryption", "passphrase", other)
    p = key_import(repo_tool("key", "export", "--paper", other).stdout)
    assert p.returncode == EXIT_KEY and "not this repository's" in p.stderr, p.stderr
    assert not any(k.startswith("keys/") for k in all_object_keys(enc_repo))  # neither wrote a slot

    p = key_import(paper)
    assert p.returncode == 0 and "from the recovery key" in p.stdout, p.stderr
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    monkeypatch.setenv("CBTFS_KEY_FILE", str(keyfile))
    restored = tmp_path / "r.img"
    repo_tool("restore", enc_repo, VDI, "latest", restored)
    assert files_equal(restored, img)
    assert key_import(one_line + "\n").returncode == 0  # the one-line form is as good
    assert len(repo_tool("key", "list", enc_repo).stdout.splitlines()) == 2
    assert data_digest(enc_repo) == before
    assert "verify OK" in repo_tool("verify", enc_repo).stdout


@pytest.mark.same_on_every_backend
def test_copy_between_two_encrypted_repositories_with_their_own_passphrases(enc_repo, tmp_path, monkeypatch,
                                                                             passphrase):
    """And with their own ciphers: the off-site copy is AES-256-GCM, as a
    site whose rules ask for GCM would make it."""
    img = guest_image(tmp_path / "d.img", 14)
    import_image(enc_repo, img, VDI, "2026-11-30T010000Z", vm=VM_NAME)
    offsite_pass = tmp_path / "offsite-passphrase"
    offsite_pass.write_text("the off-site copy's own passphrase\n")
    offsite = new_repo_location(tmp_path, "offsite")
    p = repo_tool("init", "--cipher", "aes-256-gcm", offsite, check=False)
    assert p.returncode == EXIT_USAGE and "--encryption" in p.stderr, p.stderr
    repo_tool("--passphrase-file", offsite_pass, "init", "--encryption", "passphrase", "--cipher", "aes-256-gcm",
              offsite)

    p = repo_tool("copy", enc_repo, offsite, check=False)  # the source's passphrase does not open it
    assert p.returncode == EXIT_KEY and "opens none of its key slots" in p.stderr, p.stderr
    repo_tool("copy", "--dst-passphrase-file", offsite_pass, enc_repo, offsite)
    monkeypatch.setenv("CBTFS_PASSPHRASE_FILE", str(offsite_pass))
    restored = tmp_path / "r.img"
    repo_tool("restore", offsite, VDI, "latest", restored)
    assert files_equal(restored, img)
    assert ls_json(offsite)["vdis"][0]["vm_name"] == VM_NAME
    assert "encryption  AES-256-GCM, 1 key slot(s)" in repo_tool("info", offsite).stdout
    assert "verify OK" in repo_tool("verify", offsite).stdout
    with Mount(offsite, tmp_path / "mnt") as m:
        assert files_equal(m.path(VDI, "latest.raw"), img)
    for key in all_object_keys(offsite):
        assert MARKER not in get_object(offsite, key), key


@pytest.mark.same_on_every_backend
def test_secrets_reach_no_output_log_or_json(enc_repo, tmp_path, monkeypatch):
    """The passphrase given the leakiest way (the environment) and a wrong
    one: no command prints either, in text, --json or errors."""
    secret = "s3cret-passphrase-7f3a9c"
    wrong = "wr0ng-passphrase-7f3a9c"
    r = new_repo_location(tmp_path, "env")
    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE")
    monkeypatch.setenv("CBTFS_PASSPHRASE", secret)
    outputs = [repo_tool("init", "--encryption", "passphrase", r)]
    img = guest_image(tmp_path / "d.img", 15)
    outputs.append(import_image(r, img, VDI, "2026-11-30T010000Z"))
    for args in (["ls", r], ["ls", "--json", r], ["info", r], ["info", r, VDI], ["verify", r],
                 ["verify", "--stored-only", r], ["key", "list", r], ["restore", r, VDI, "latest", tmp_path / "x.img"]):
        outputs.append(repo_tool(*args))
    with Mount(r, tmp_path / "mnt") as m:
        assert files_equal(m.path(VDI, "latest.raw"), img)
    monkeypatch.setenv("CBTFS_PASSPHRASE", wrong)
    for args in (["ls", "--json", r], ["verify", r], ["import", "-q", "--vdi", VDI, r, img]):
        p = repo_tool(*args, check=False)
        assert p.returncode == EXIT_KEY, p.stderr
        outputs.append(p)
    m = run(CBTFS, "-f", r, tmp_path / "mnt", check=False)
    assert m.returncode == EXIT_KEY
    outputs.append(m)
    for p in outputs:
        for s in (secret, wrong):
            assert s not in p.stdout + p.stderr, (p.args, p.stdout, p.stderr)


def test_an_admins_week_on_an_encrypted_repository(tmp_path, monkeypatch, mnt):
    """The paths an admin walks, on an encrypted repository, with the key
    in a root-only file and nowhere in the environment: a 6 GiB sparse disk
    mounted by mount(8) as an fstab line does (daemonized, the key file as a
    mount option), read through the kernel past 4 GiB; a new backup and a
    prune with its collection while that mount stays up."""
    from test_user_paths import BIG_EXTENTS, BIG_SIZE, GiB, HelperMount, sparse_image

    monkeypatch.delenv("CBTFS_PASSPHRASE_FILE", raising=False)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    pf = root_only_file(keys / "passphrase", "an admin's passphrase, root only\n")
    repo = new_repo_location(tmp_path, "enc")

    def tool(*args, check=True):
        return repo_tool("--passphrase-file", pf, *args, check=check)

    tool("init", "--encryption", "passphrase", repo)
    img = sparse_image(tmp_path / "big.img", BIG_SIZE, BIG_EXTENTS)
    tool("import", "-q", "--vdi", VDI, "--time", "2026-11-23T03:00:00Z", repo, img)
    # what to read back: every extent, the 4 GiB boundary and the disk's end
    places = BIG_EXTENTS + [(4 * GiB - BLOCK, 2 * BLOCK), (BIG_SIZE - 100, 100)]

    def contents(path):
        with open(path, "rb") as f:
            return [(f.seek(off), f.read(length))[1] for off, length in places]

    first = contents(img)

    def read_extents(path, want):
        assert contents(path) == want

    with HelperMount(repo, mnt, f"passphrase_file={pf}") as m:
        p1 = m.path(VDI, "2026-11-23T030000Z.raw")
        assert os.path.getsize(p1) == BIG_SIZE
        read_extents(p1, first)

        # Tuesday's backup: data changed past 4 GiB, seen by the mount
        with open(img, "r+b") as f:
            f.seek(5 * GiB + BLOCK)
            f.write(random.Random(21).randbytes(2 * BLOCK))
        tool("import", "-q", "--vdi", VDI, "--time", "2026-11-24T03:00:00Z", repo, img)
        time.sleep(1.1)  # the kernel's entry and attribute timeouts
        p2 = m.path(VDI, "2026-11-24T030000Z.raw")
        second = contents(img)
        assert second != first
        read_extents(p2, second)
        read_extents(p1, first)

        # the retention: Monday's point goes, and the collection with it
        mondays = sorted(k for k in all_object_keys(repo) if k.startswith(f"vdis/{VDI}/points/"))[0]
        monday = get_object(repo, mondays)
        out = tool("prune", "--keep-last", "1", repo).stdout
        assert "removed 1 point(s)" in out, out
        time.sleep(1.1)
        assert sorted(os.listdir(m.path(VDI))) == ["2026-11-24T030000Z.raw", "latest.raw"]
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        read_extents(p2, second)
        read_extents(m.path(VDI, "latest.raw"), second)

        # Monday's manifest put back by hand (a restored bucket, an old
        # rsync): the sealed point list keeps it out of the running mount
        put_object(repo, mondays, monday)
        time.sleep(1.1)
        assert sorted(os.listdir(m.path(VDI))) == ["2026-11-24T030000Z.raw", "latest.raw"]
        assert not os.path.exists(p1)
        read_extents(m.path(VDI, "latest.raw"), second)
    v = tool("verify", repo, check=False)
    assert v.returncode == 1 and "was removed by a prune and its manifest is back" in v.stdout, v.stdout
    remove_object(repo, mondays)
    assert "verify OK" in tool("verify", repo).stdout
    assert "verify OK" in repo_tool("verify", "--stored-only", repo).stdout


@pytest.mark.same_on_every_backend
def test_a_pruned_point_put_back_or_the_newest_removed_is_found_by_verify(enc_repo, tmp_path):
    """Each manifest opens on its own; the sealed point list that every
    commit and prune writes tells verify which points there should be, and
    the readers (ls, the mount, restore) which to leave out."""
    img = guest_image(tmp_path / "d.img", 16)
    times = ("2026-11-27T010000Z", "2026-11-28T010000Z", "2026-11-29T010000Z", "2026-11-30T010000Z")
    for i, t in enumerate(times):
        with open(img, "r+b") as f:
            f.seek(i * BLOCK)
            f.write(random.Random(i).randbytes(BLOCK))
        import_image(enc_repo, img, VDI, t)
    points = sorted(k for k in all_object_keys(enc_repo) if k.startswith(f"vdis/{VDI}/points/"))
    saved = {k: get_object(enc_repo, k) for k in points}
    lists = [k for k in all_object_keys(enc_repo) if k.startswith(f"vdis/{VDI}/lists/")]
    assert len(lists) == 1, lists  # each generation replaces the one before
    old_list = (lists[0], get_object(enc_repo, lists[0]))
    assert "verify OK" in repo_tool("verify", enc_repo).stdout

    repo_tool("prune", "--keep-last", "2", enc_repo)
    assert "verify OK" in repo_tool("verify", enc_repo).stdout
    put_object(enc_repo, points[0], saved[points[0]])  # a pruned point put back
    v = repo_tool("verify", enc_repo, check=False)
    assert v.returncode == 1 and "2026-11-27T010000Z (seq 1) was removed by a prune and its manifest is back" in v.stdout, v.stdout
    # the readers leave it out, and say why
    ls = repo_tool("ls", enc_repo, check=False)
    assert "2026-11-27T010000Z" not in ls.stdout and "2026-11-29T010000Z" in ls.stdout, ls.stdout
    assert "point 1 is not in the sealed point list" in ls.stderr, ls.stderr
    with Mount(enc_repo, tmp_path / "mnt") as m:
        assert sorted(os.listdir(m.path(VDI))) == ["2026-11-29T010000Z.raw", "2026-11-30T010000Z.raw", "latest.raw"]
    r = repo_tool("restore", enc_repo, VDI, "2026-11-27T010000Z", tmp_path / "back.img", check=False)
    assert r.returncode != 0 and not (tmp_path / "back.img").exists(), r.stdout + r.stderr
    remove_object(enc_repo, points[0])

    remove_object(enc_repo, points[-1])  # the newest point removed
    v = repo_tool("verify", enc_repo, check=False)
    assert v.returncode == 1 and "point 4 is missing" in v.stdout, v.stdout
    put_object(enc_repo, points[-1], saved[points[-1]])
    assert "verify OK" in repo_tool("verify", enc_repo).stdout

    # the old list put back in place of the newest, with the pruned points:
    # it names them as missing
    current = [k for k in all_object_keys(enc_repo) if k.startswith(f"vdis/{VDI}/lists/")]
    for k in current:
        remove_object(enc_repo, k)
    put_object(enc_repo, old_list[0], old_list[1])
    v = repo_tool("verify", enc_repo, check=False)
    assert v.returncode == 1 and "point 1 is missing" in v.stdout and "point 2 is missing" in v.stdout, v.stdout
    # a list moved from another name does not open
    remove_object(enc_repo, old_list[0])
    put_object(enc_repo, old_list[0].replace(old_list[0].split("/")[-1], "00000099.list"), old_list[1])
    v = repo_tool("verify", enc_repo, check=False)
    assert v.returncode == 1 and "does not open" in v.stdout, v.stdout
