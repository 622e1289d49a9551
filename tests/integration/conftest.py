"""Fixtures for the integration tests: real binaries, real FUSE mounts,
real loop devices. Each test gets its own repository and mount point; a
mount is started in the foreground, polled until it is mounted (failing
early if the daemon died), and unmounted with fusermount3, after which the
daemon must exit 0."""

import json
import os
import shutil
import subprocess
import time

import pytest

BUILD = os.environ.get("CBTFS_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
CBTFS = os.path.abspath(os.path.join(BUILD, "src", "cbtfs"))
REPO_TOOL = os.path.abspath(os.path.join(BUILD, "src", "cbtfs-repo"))
BLOCK = 65536


def pytest_configure(config):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.exit("integration tests need root and /dev/fuse", returncode=77)
    for tool in (CBTFS, REPO_TOOL):
        if not os.access(tool, os.X_OK):
            pytest.exit(f"{tool} is not built", returncode=1)


def run(*args, check=True, **kw):
    """Runs a command, returns CompletedProcess; output captured as text."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed with {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def repo_tool(*args, check=True):
    return run(REPO_TOOL, *args, check=check)


def import_image(repo, image, vdi, time_iso, **names):
    args = ["import", "-q", "--vdi", vdi, "--time", time_iso]
    if "vm" in names:
        args += ["--vm-name", names["vm"]]
    if "name" in names:
        args += ["--vdi-name", names["name"]]
    return repo_tool(*args, repo, image)


def ls_json(repo):
    return json.loads(repo_tool("ls", "--json", repo).stdout)


class Mount:
    def __init__(self, repo, mnt, *opts):
        self.repo, self.mnt = str(repo), str(mnt)
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = subprocess.Popen([CBTFS, "-f", *opts, self.repo, self.mnt],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"cbtfs exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("cbtfs did not mount within 10 s")
            time.sleep(0.02)
        self.log = ""

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def unmount(self):
        if self.proc is None:
            return
        run("fusermount3", "-u", self.mnt)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("cbtfs did not exit after unmount")
        self.log = self.proc.stderr.read()
        self.proc = None
        assert rc == 0, f"cbtfs exited with {rc}: {self.log}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            if exc[0] is None:
                self.unmount()
            else:  # already failing: clean up without masking the error
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
                self.proc.kill()


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    repo_tool("init", r)
    return r


@pytest.fixture
def mnt(tmp_path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    if os.path.ismount(m):
        subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)


def files_equal(a, b):
    return run("cmp", a, b, check=False).returncode == 0


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        c = f.read(1)
        f.seek(offset)
        f.write(bytes([c[0] ^ 0x5A]))
