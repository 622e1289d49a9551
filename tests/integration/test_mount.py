"""A GPT + ext4 disk through several states, each imported; every point read
through a real mount must equal the state it came from."""

import errno
import os
import random
import shutil
import subprocess
import time

import pytest

from conftest import BLOCK, CBTFS, Mount, files_equal, import_image, ls_json, repo_tool, run, write_at
from disk import PART_START, Disk, _FsMount, mount_ro

VDI = "6f4b1c2e-0a3d-4e5f-8a9b-0c1d2e3f4a5b"
TIMES = ["2026-11-20T03:00:00Z", "2026-11-21T03:00:00Z", "2026-11-22T03:00:00Z", "2026-11-23T03:00:00Z"]
NAMES = ["2026-11-20T030000Z.raw", "2026-11-21T030000Z.raw", "2026-11-22T030000Z.raw", "2026-11-23T030000Z.raw"]
PART1 = [n.replace(".raw", "-part1.raw") for n in NAMES]  # each point of the GPT disk shows its partition


@pytest.fixture
def chain(tmp_path, repo):
    """Four states of a 48 MiB + 12 KiB disk (not a multiple of 64 KiB)."""
    rnd = random.Random(42)
    disk = Disk(tmp_path / "disk.img", 48 * 1024 * 1024 + 12 * 1024)
    states = []
    # 1: files added
    with disk.mount_fs() as fs:
        for i in range(20):
            with open(os.path.join(fs, f"file{i}.bin"), "wb") as f:
                f.write(rnd.randbytes(rnd.randint(1, 300_000)))
        with open(os.path.join(fs, "hello.txt"), "w") as f:
            f.write("state one\n")
    states.append(disk.snapshot(tmp_path / "s1.img"))
    # 2: files changed and deleted
    with disk.mount_fs() as fs:
        with open(os.path.join(fs, "hello.txt"), "w") as f:
            f.write("state two\n")
        for i in range(0, 20, 3):
            os.unlink(os.path.join(fs, f"file{i}.bin"))
        with open(os.path.join(fs, "file1.bin"), "r+b") as f:
            f.seek(1000)
            f.write(b"changed")
    states.append(disk.snapshot(tmp_path / "s2.img"))
    # 3: raw writes: one byte, a whole range, and the last partial block
    size = os.path.getsize(disk.path)
    write_at(disk.path, 40 * 1024 * 1024 + 7, b"\x01")
    write_at(disk.path, 44 * 1024 * 1024, rnd.randbytes(3 * BLOCK + 100))
    write_at(disk.path, size - 100, rnd.randbytes(100))
    states.append(disk.snapshot(tmp_path / "s3.img"))
    # 4: zeroed ranges (written zeros and a punched hole)
    write_at(disk.path, 44 * 1024 * 1024, bytes(2 * BLOCK))
    subprocess.run(["fallocate", "-p", "-o", str(40 * 1024 * 1024), "-l", str(BLOCK), disk.path], check=True)
    states.append(disk.snapshot(tmp_path / "s4.img"))
    for s, t in zip(states, TIMES):
        import_image(repo, s, VDI, t, vm="test vm", name="system disk")
    return states


def test_every_point_reads_back_exactly(chain, repo, mnt):
    with Mount(repo, mnt) as m:
        listing = sorted(os.listdir(m.path(VDI)))
        assert listing == sorted(NAMES + PART1 + ["latest.raw", "latest-part1.raw"])
        for state, name in zip(chain, NAMES):
            assert os.path.getsize(m.path(VDI, name)) == os.path.getsize(state)
            assert files_equal(m.path(VDI, name), state), name
        assert os.readlink(m.path(VDI, "latest.raw")) == NAMES[-1]
        assert files_equal(m.path(VDI, "latest.raw"), chain[-1])
        # Deltas stored only what changed.
        pts = ls_json(repo)["vdis"][0]["points"]
        assert pts[0]["full"] and not any(p["full"] for p in pts[1:])
        assert pts[2]["blocks_written"] <= 6  # 1 + 4 (range over 4 blocks) + 1 (tail)
        assert pts[3]["blocks_written"] == 0  # only zeros: nothing stored


def test_old_point_loop_mounts_with_its_files(chain, repo, mnt, tmp_path):
    with Mount(repo, mnt) as m:
        with mount_ro(m.path(VDI, NAMES[0])) as fs:
            assert open(os.path.join(fs, "hello.txt")).read() == "state one\n"
            assert os.path.exists(os.path.join(fs, "file0.bin"))
        with mount_ro(m.path(VDI, NAMES[1])) as fs:
            assert open(os.path.join(fs, "hello.txt")).read() == "state two\n"
            assert not os.path.exists(os.path.join(fs, "file0.bin"))
        with mount_ro(m.path(VDI, PART1[1]), 0) as fs:  # the same, without an offset
            assert open(os.path.join(fs, "hello.txt")).read() == "state two\n"
        # The GPT reads back through the mount (primary and backup copies:
        # sgdisk checks both, the backup lives in the last, partial block).
        out = run("sgdisk", "-v", m.path(VDI, NAMES[1])).stdout
        assert "No problems found" in out
        out = run("sgdisk", "-i", "1", m.path(VDI, NAMES[1])).stdout
        assert "First sector: 2048" in out


def test_sparse_copy_is_identical_and_sparse(chain, repo, mnt, tmp_path):
    with Mount(repo, mnt) as m:
        dst = tmp_path / "copy.img"
        run("cp", "--sparse=always", m.path(VDI, NAMES[2]), dst)
        assert files_equal(dst, chain[2])
        allocated = os.stat(dst).st_blocks * 512
        assert allocated < os.path.getsize(dst) // 2, allocated
        # SEEK_DATA / SEEK_HOLE agree with the content.
        fd = os.open(m.path(VDI, NAMES[2]), os.O_RDONLY)
        try:
            data = os.lseek(fd, 0, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert data % BLOCK == 0 and hole > data
            with pytest.raises(OSError) as e:
                os.lseek(fd, os.path.getsize(dst), os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)


def test_point_committed_while_mounted_appears(chain, repo, mnt, tmp_path):
    with Mount(repo, mnt) as m:
        assert os.readlink(m.path(VDI, "latest.raw")) == NAMES[-1]
        new = tmp_path / "s5.img"
        shutil.copyfile(chain[-1], new)
        write_at(new, 1000 * BLOCK // 2, b"new point")
        import_image(repo, new, VDI, "2026-11-24T03:00:00Z")
        name = "2026-11-24T030000Z.raw"
        deadline = time.monotonic() + 5
        while name not in os.listdir(m.path(VDI)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert files_equal(m.path(VDI, name), new)
        deadline = time.monotonic() + 5
        while os.readlink(m.path(VDI, "latest.raw")) != name and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.readlink(m.path(VDI, "latest.raw")) == name
        # A new VDI appears too.
        other = "7f4b1c2e-0a3d-4e5f-8a9b-0c1d2e3f4a5b"
        import_image(repo, new, other, "2026-11-24T03:00:00Z")
        deadline = time.monotonic() + 5
        while other not in os.listdir(m.mnt) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert files_equal(m.path(other, name), new)


def test_read_only_modes_xattrs_and_names(chain, repo, mnt):
    with Mount(repo, mnt) as m:
        img = m.path(VDI, NAMES[0])
        st = os.stat(img)
        assert st.st_mode & 0o777 == 0o400
        with pytest.raises(OSError) as e:
            os.open(img, os.O_RDWR)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        assert os.getxattr(img, "user.cbtfs.vdi_uuid").decode() == VDI
        assert os.getxattr(img, "user.cbtfs.time").decode() == TIMES[0]
        assert os.getxattr(img, "user.cbtfs.vm_name").decode() == "test vm"
        assert "user.cbtfs.snapshot_uuid" in os.listxattr(img)
        link = m.path("by-name", "test vm", "system disk")
        assert os.readlink(link) == f"../../{VDI}"
        assert sorted(os.listdir(link)) == sorted(NAMES + PART1 + ["latest.raw", "latest-part1.raw"])
    with Mount(repo, mnt, "-o", "mode=0444") as m:
        assert os.stat(m.path(VDI, NAMES[0])).st_mode & 0o777 == 0o444


def test_mount_helper_and_fstab_style(chain, repo, mnt, tmp_path):
    # mount(8) runs mount.fuse3, which runs "cbtfs REPO MNT -o ..." with a
    # fixed PATH: the built binary is linked into /usr/local/bin for the test.
    link = "/usr/local/bin/cbtfs"
    if os.path.exists(link) and os.path.realpath(link) != os.path.realpath(CBTFS):
        pytest.skip(f"{link} is another cbtfs; not replacing it")
    made = not os.path.exists(link)
    if made:
        os.symlink(CBTFS, link)
    try:
        run("mount", "-t", "fuse.cbtfs", "-o", "mode=0440", repo, mnt)
        assert os.path.ismount(mnt)
        img = os.path.join(mnt, VDI, NAMES[1])
        assert os.stat(img).st_mode & 0o777 == 0o440
        assert files_equal(img, chain[1])
        run("umount", mnt)
    finally:
        if os.path.ismount(mnt):
            run("umount", "-l", mnt, check=False)
        if made:
            os.unlink(link)


def test_mount_refuses_bad_repositories(tmp_path, mnt):
    p = run(CBTFS, tmp_path / "missing", mnt, check=False)
    assert p.returncode == 3 and "cannot open repository" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run(CBTFS, tmp_path / "empty", mnt, check=False)
    assert p.returncode == 3 and "not a cbtfs repository" in p.stderr
    p = run(CBTFS, tmp_path / "empty", mnt, "-o", "mode=0644", check=False)
    assert p.returncode == 2
    assert not os.path.ismount(mnt)


def test_restore_to_a_file_is_identical_and_sparse(chain, repo, tmp_path):
    dst = tmp_path / "restored.img"
    repo_tool("restore", repo, VDI, NAMES[1], dst)
    assert files_equal(dst, chain[1])
    assert os.stat(dst).st_blocks * 512 < os.path.getsize(dst) // 2
    p = repo_tool("restore", repo, VDI, "latest", dst, check=False)
    assert p.returncode == 2 and "--force" in p.stderr
    repo_tool("restore", "--force", repo, VDI, "latest", dst)
    assert files_equal(dst, chain[-1])
    p = repo_tool("restore", repo, VDI, "2020-01-01T000000Z", tmp_path / "x.img", check=False)
    assert p.returncode == 2 and "has no point" in p.stderr


def test_restore_to_a_block_device_writes_zeros_over_the_holes(chain, repo, tmp_path):
    size = os.path.getsize(chain[-1])
    dev_file = tmp_path / "device.img"
    dev_file.write_bytes(b"\xff" * size)  # old contents where the point has holes
    dev = run("losetup", "--find", "--show", dev_file).stdout.strip()
    try:
        repo_tool("restore", repo, VDI, "latest", dev)
        run("sync")
    finally:
        run("losetup", "-d", dev)
    assert files_equal(dev_file, chain[-1])


def fs_image(path, size_mib, kind, files=None, tmp=None):
    """A file system image: ext4 filled from a directory, or an empty vfat."""
    if kind == "ext4":
        src = tmp / (path.name + ".d")
        src.mkdir()
        for name, text in (files or {}).items():
            (src / name).write_text(text)
        run("mkfs.ext4", "-q", "-F", "-d", src, path, f"{size_mib}M")
    else:
        run("mkfs.vfat", "-C", path, str(size_mib * 1024))
    return path


def place(disk, offset, image):
    with open(disk, "r+b") as d, open(image, "rb") as f:
        d.seek(offset)
        d.write(f.read())


def test_partitions_are_files_that_loop_mount(tmp_path, repo, mnt):
    mib, sector = 1 << 20, 512
    gpt = tmp_path / "gpt.img"
    with open(gpt, "wb") as f:
        f.truncate(48 * mib)
    run("sgdisk", "-n1:2048:+20M", "-n2:0:+16M", gpt)
    ext = fs_image(tmp_path / "g1.ext4", 20, "ext4", {"hello.txt": "from GPT partition 1\n"}, tmp_path)
    fat = fs_image(tmp_path / "g2.vfat", 16, "vfat")
    place(gpt, 2048 * sector, ext)
    start2 = int(run("sgdisk", "-i2", gpt).stdout.split("First sector: ")[1].split()[0])
    place(gpt, start2 * sector, fat)

    mbr = tmp_path / "mbr.img"
    with open(mbr, "wb") as f:
        f.truncate(64 * mib)
    # a primary, then an extended partition holding two logical ones
    run("sfdisk", "-q", mbr, input="label: dos\n"
        "start=2048, size=20480, type=83\n"
        "start=22528, size=81920, type=5\n"
        "start=24576, size=40960, type=83\n"
        "start=67584, size=30720, type=c\n")
    p1 = fs_image(tmp_path / "m1.ext4", 10, "ext4", {"a.txt": "primary\n"}, tmp_path)
    p5 = fs_image(tmp_path / "m5.ext4", 20, "ext4", {"b.txt": "first logical\n"}, tmp_path)
    p6 = fs_image(tmp_path / "m6.vfat", 15, "vfat")
    for start, img in ((2048, p1), (24576, p5), (67584, p6)):
        place(mbr, start * sector, img)

    vg, vm = "6f7a8b9c-0d1e-4f2a-8b3c-4d5e6f7a8b9c", "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d"
    import_image(repo, gpt, vg, "2026-11-20T03:00:00Z")
    import_image(repo, mbr, vm, "2026-11-20T03:00:00Z")
    with Mount(repo, mnt) as m:
        base = "2026-11-20T030000Z"
        assert sorted(os.listdir(m.path(vg))) == [f"{base}-part1.raw", f"{base}-part2.raw", f"{base}.raw",
                                                  "latest-part1.raw", "latest-part2.raw", "latest.raw"]
        assert sorted(os.listdir(m.path(vm))) == [f"{base}-part1.raw", f"{base}-part5.raw", f"{base}-part6.raw",
                                                  f"{base}.raw", "latest-part1.raw", "latest-part5.raw",
                                                  "latest-part6.raw", "latest.raw"]
        for vdi, n, img in ((vg, 1, ext), (vg, 2, fat), (vm, 1, p1), (vm, 5, p5), (vm, 6, p6)):
            part = m.path(vdi, f"{base}-part{n}.raw")
            assert os.path.getsize(part) == os.path.getsize(img)
            assert files_equal(part, img), part
            assert os.getxattr(part, "user.cbtfs.partition") == str(n).encode()
        # No offset arithmetic: the partition files mount as they are.
        with mount_ro(m.path(vg, f"{base}-part1.raw"), 0) as fs:
            assert open(os.path.join(fs, "hello.txt")).read() == "from GPT partition 1\n"
        with mount_ro(m.path(vm, f"{base}-part5.raw"), 0) as fs:
            assert open(os.path.join(fs, "b.txt")).read() == "first logical\n"
        # (This kernel may lack vfat: the FAT partition is checked by its bytes
        # above and by its boot sector here.)
        with open(m.path(vm, f"{base}-part6.raw"), "rb") as f:
            assert f.read(512)[510:] == b"\x55\xaa"
        # Reads stop at the partition's end; holes are found within it.
        with open(m.path(vm, f"{base}-part1.raw"), "rb") as f:
            f.seek(os.path.getsize(p1) - 10)
            assert f.read(100) == open(p1, "rb").read()[-10:]
            assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 0


def tree_digest(root):
    import hashlib
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_overlay_makes_points_writable_and_forgets(chain, repo, mnt):
    before = tree_digest(repo)
    with Mount(repo, mnt, "-o", "overlay") as m:
        img, part = m.path(VDI, NAMES[0]), m.path(VDI, PART1[0])
        assert os.stat(img).st_mode & 0o777 == 0o600
        # A real file system, mounted read-write from a point, then checked.
        with _FsMount(part, 0, ro=False) as fs:
            with open(os.path.join(fs, "new.txt"), "w") as f:
                f.write("written on the overlay\n")
            os.unlink(os.path.join(fs, "hello.txt"))
        assert run("e2fsck", "-f", "-n", part, check=False).returncode == 0
        # The whole image shows what went through its partition's file.
        with mount_ro(img) as fs:
            assert open(os.path.join(fs, "new.txt")).read() == "written on the overlay\n"
            assert not os.path.exists(os.path.join(fs, "hello.txt"))
        # Other points are untouched, and an image cannot grow.
        assert files_equal(m.path(VDI, NAMES[1]), chain[1])
        fd = os.open(img, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x", os.path.getsize(img))
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
    # The repository was never written, and the writes are gone.
    assert tree_digest(repo) == before
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(VDI, NAMES[0]), chain[0])
        with pytest.raises(OSError) as e:
            os.open(m.path(VDI, NAMES[0]), os.O_RDWR)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    assert repo_tool("verify", repo).returncode == 0


def test_overlay_in_a_directory(chain, repo, mnt, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with Mount(repo, mnt, "-o", f"overlay={scratch}") as m:
        img = m.path(VDI, NAMES[2])
        with open(img, "r+b") as f:
            f.seek(12345)
            f.write(b"overlay bytes")
        with open(img, "rb") as f:
            f.seek(12340)
            want = open(chain[2], "rb").read()[12340:12345] + b"overlay bytes"
            assert f.read(18) == want
        assert os.listdir(scratch) == []  # unlinked scratch files: nothing to clean up
    with Mount(repo, mnt) as m:
        assert files_equal(m.path(VDI, NAMES[2]), chain[2])
