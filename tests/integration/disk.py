"""A test disk with a GPT and an ext4 file system, changed the way a guest
would change it: files through a loop mount of the partition, raw writes and
zeroed ranges straight into the image."""

import os
import shutil
import subprocess
import tempfile

PART_START = 1 << 20  # first partition at 1 MiB, as partitioning tools do


def sh(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


class Disk:
    def __init__(self, path, size):
        self.path = str(path)
        with open(self.path, "wb") as f:
            f.truncate(size)
        # One Linux partition from 1 MiB to 1 MiB before the end.
        sh("sgdisk", "-n", "1:2048:-1M", "-t", "1:8300", self.path)
        out = subprocess.run(["sgdisk", "-i", "1", self.path], check=True, capture_output=True, text=True).stdout
        last = next(int(l.split()[2]) for l in out.splitlines() if l.startswith("Last sector"))
        self.part_size = (last + 1) * 512 - PART_START
        sh("mkfs.ext4", "-q", "-F", "-E", f"offset={PART_START}", self.path, f"{self.part_size // 1024}k")

    def mount_fs(self):
        return _FsMount(self.path, PART_START)

    def snapshot(self, dest):
        shutil.copyfile(self.path, dest)
        return str(dest)


class _FsMount:
    def __init__(self, image, offset, ro=False):
        self.dir = tempfile.mkdtemp(prefix="cbtfs-fs-")
        opts = f"loop,offset={offset}" + (",ro" if ro else "")
        sh("mount", "-o", opts, image, self.dir)

    def __enter__(self):
        return self.dir

    def __exit__(self, *exc):
        sh("umount", self.dir)
        os.rmdir(self.dir)


def mount_ro(image, offset=PART_START):
    return _FsMount(image, offset, ro=True)
