"""Fixtures for the integration tests: real binaries, real FUSE mounts,
real loop devices. Each test gets its own repository and mount point; a
mount is started in the foreground, polled until it is mounted (failing
early if the daemon died), and unmounted with fusermount3, after which the
daemon must exit 0.

CBTFS_TEST_BACKEND=s3 runs the same tests with every repository in a bucket
of a real Ceph RADOS Gateway, started for the run on loopback; the helpers
below (list_objects, flip_object_byte, ...) reach repository objects on
either backend. Repositories the tests make are format 2 (a shared,
deduplicated block store), the default of cbtfs-repo init, unless a test
asks otherwise; CBTFS_TEST_FORMAT=1 makes every one format 1 (a store per
VDI), which repositories made before format 2 still are."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

BUILD = os.environ.get("CBTFS_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
CBTFS = os.path.abspath(os.path.join(BUILD, "src", "cbtfs"))
REPO_TOOL = os.path.abspath(os.path.join(BUILD, "src", "cbtfs-repo"))
BLOCK = 65536
BACKEND = os.environ.get("CBTFS_TEST_BACKEND", "local")
FORMAT = os.environ.get("CBTFS_TEST_FORMAT", "2")
BUCKET = "cbtfs-tests"
LEASE_SECONDS = 2  # S3 lock lease in tests: a killed writer's lock frees quickly
_rgw = None


def pytest_configure(config):
    global _rgw
    config.addinivalue_line("markers", "same_on_every_backend: a test of what no storage backend changes (key "
                            "handling, messages, TLS); CI's S3 session leaves it to the local run")
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.exit("integration tests need root and /dev/fuse", returncode=77)
    for tool in (CBTFS, REPO_TOOL):
        if not os.access(tool, os.X_OK):
            pytest.exit(f"{tool} is not built", returncode=1)
    if BACKEND == "s3":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "s3"))
        from rgw import Rgw
        _rgw = Rgw(tempfile.mkdtemp(prefix="cbtfs-rgw-"))
        _rgw.start()
        _rgw.make_bucket(BUCKET)
        # Every command the tests run inherits these; none is on a command line.
        os.environ.update({"CBTFS_S3_ENDPOINT": _rgw.endpoint, "AWS_REGION": _rgw.region,
                           "AWS_ACCESS_KEY_ID": _rgw.access_key, "AWS_SECRET_ACCESS_KEY": _rgw.secret_key,
                           "CBTFS_S3_LEASE_SECONDS": str(LEASE_SECONDS)})


def pytest_unconfigure(config):
    if _rgw is not None:
        _rgw.stop()
        shutil.rmtree(_rgw.dir, ignore_errors=True)


def new_repo_location(tmp_path, name="repo"):
    """A fresh repository location on the backend under test (not created)."""
    if BACKEND == "s3":
        return f"s3://{BUCKET}/{re.sub(r'[^A-Za-z0-9-]', '-', tmp_path.name)}-{name}-{uuid.uuid4().hex[:8]}"
    return tmp_path / name


def after_kill():
    """A killed writer's lock is free at once on a local disk (flock), and
    once its lease has run out on S3."""
    if BACKEND == "s3":
        time.sleep(LEASE_SECONDS + 1.5)


def _s3_split(repo, key):
    bucket, _, prefix = str(repo)[len("s3://"):].partition("/")
    return bucket, f"{prefix}/{key}" if prefix else key


def list_objects(repo, prefix):
    """Names directly below prefix ("vdis/UUID/packs"), like os.listdir."""
    if BACKEND != "s3":
        return os.listdir(os.path.join(str(repo), prefix))
    bucket, key = _s3_split(repo, prefix + "/")
    pages = _rgw.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
    names = []
    for page in pages:
        names += [o["Key"][len(key):] for o in page.get("Contents", [])]
        names += [p["Prefix"][len(key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return names


def object_bytes(repo, prefix):
    """Bytes of every object below prefix ("store/packs"), at any depth."""
    if BACKEND != "s3":
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(str(repo), prefix))
                   for f in files if not f.startswith(".tmp."))
    bucket, key = _s3_split(repo, prefix + "/")
    pages = _rgw.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


class CoreDumps:
    """Core dumps written to DIR while in effect, and proof that this
    machine writes them (a control process dumps core first): a test that
    finds no core from cbtfs can then tell. preexec (for Popen) gives a
    child unlimited cores and the dumping signals their default."""

    PATTERN = "/proc/sys/kernel/core_pattern"

    def __init__(self, dir):
        self.dir = dir
        dir.mkdir()

    @staticmethod
    def preexec():
        import resource
        import signal
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        # a background job may have inherited SIGQUIT ignored (POSIX)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signal.signal(signal.SIGABRT, signal.SIG_DFL)

    def cores(self, wait=5):
        deadline = time.monotonic() + wait
        while not list(self.dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.dir.iterdir())

    def __enter__(self):
        import signal
        self.saved = open(self.PATTERN).read()
        with open(self.PATTERN, "w") as f:
            f.write(f"{self.dir}/core.%e.%p")
        # it kills itself once it runs, so no signal can come too early
        p = subprocess.Popen(["sh", "-c", "kill -ABRT $$"], preexec_fn=self.preexec)
        p.wait()
        assert p.returncode == -signal.SIGABRT
        assert self.cores(), ("this machine does not write core dumps; the test cannot tell",
                              open(self.PATTERN).read())
        for c in self.dir.iterdir():
            c.unlink()
        return self

    def __exit__(self, *exc):
        with open(self.PATTERN, "w") as f:
            f.write(self.saved)


def all_object_keys(repo):
    """Every object of the repository at any depth, temporaries aside."""
    if BACKEND != "s3":
        root = str(repo)
        return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                if not f.startswith(".tmp.")]
    bucket, key = _s3_split(repo, "")
    pages = _rgw.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return [o["Key"][len(key):] for page in pages for o in page.get("Contents", [])]


def unfinished_uploads(repo):
    """Multipart uploads left open under the repository (S3's temporaries)."""
    if BACKEND != "s3":
        return []
    bucket, key = _s3_split(repo, "")
    return _rgw.client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])


def get_object(repo, key):
    if BACKEND != "s3":
        with open(os.path.join(str(repo), key), "rb") as f:
            return f.read()
    bucket, k = _s3_split(repo, key)
    return _rgw.client().get_object(Bucket=bucket, Key=k)["Body"].read()


def put_object(repo, key, data):
    """Overwrites a repository object in place, as damage would (or puts
    back one that was removed)."""
    if BACKEND != "s3":
        path = os.path.join(str(repo), key)
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.write(data)
            f.truncate()
        return
    bucket, k = _s3_split(repo, key)
    _rgw.client().put_object(Bucket=bucket, Key=k, Body=data)


def remove_object(repo, key):
    """Removes a repository object, as a lost file or a careless admin would."""
    if BACKEND != "s3":
        os.remove(os.path.join(str(repo), key))
        return
    bucket, k = _s3_split(repo, key)
    _rgw.client().delete_object(Bucket=bucket, Key=k)


def pack_of_point(repo, vdi, seq=1):
    """The key of the (first) pack point seq wrote, in either format: the
    VDI's own (format 1), or one in the shared store (format 2)."""
    point = json.loads(get_object(repo, f"vdis/{vdi}/points/{seq:08d}.point"))["point"]
    if "packs" not in point:
        return f"vdis/{vdi}/packs/{point['pack']:08d}.pack"
    pack = f"{point['packs'][0]:016x}"
    return f"store/packs/{pack[:2]}/{pack}.pack"


def flip_object_byte(repo, key, offset):
    data = bytearray(get_object(repo, key))
    data[offset] ^= 0x5A
    put_object(repo, key, bytes(data))


def run(*args, check=True, **kw):
    """Runs a command, returns CompletedProcess; output captured as text."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed with {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def repo_tool(*args, check=True):
    if args and args[0] == "init" and "--format" not in args:
        args = ("init", "--format", FORMAT) + tuple(args[1:])
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


def process_state(pid):
    """Where each thread of a stuck process waits, and whether its mount
    lives on in some other mount namespace: what a hang report needs."""
    lines = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{pid}/task/{tid}/stack") as f:
                stack = " < ".join(l.split()[1] for l in f.read().splitlines()[:6])
        except OSError as e:
            state, wchan, stack = "?", "?", str(e)
        lines.append(f"thread {tid}: {state} in {wchan}: {stack}")
    fuse_elsewhere = subprocess.run("grep -l 'fuse.cbtfs' /proc/[0-9]*/mountinfo 2>/dev/null | head -5", shell=True,
                                    capture_output=True, text=True).stdout.split()
    lines.append(f"processes whose mount namespace still holds a cbtfs mount: {fuse_elsewhere}")
    return "\n".join(lines)


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
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            state = process_state(self.proc.pid)
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"cbtfs did not exit within 30 s of its unmount\n{state}\nstderr: {err[-4000:]}")
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
    r = new_repo_location(tmp_path)
    repo_tool("init", r)
    return r


@pytest.fixture
def mnt(tmp_path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    if os.path.ismount(m):
        subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)


def image(path, nblocks, seed):
    """A file of nblocks random 64 KiB blocks (incompressible), from a fixed seed."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(nblocks):
            f.write(rnd.randbytes(BLOCK))
    return str(path)


def root_only_file(path, text):
    """A secret as an admin keeps one: a file only root can read."""
    path.write_text(text)
    path.chmod(0o400)
    return path


def keyfile_repo(tmp_path, monkeypatch, name="enc"):
    """An encrypted repository opened by a root-only key file, as a nightly
    job keeps one; CBTFS_KEY_FILE names it for every command the test runs."""
    import secrets
    key = root_only_file(tmp_path / f"{name}.key", secrets.token_hex(32))
    monkeypatch.setenv("CBTFS_KEY_FILE", str(key))
    repo = new_repo_location(tmp_path, name)
    repo_tool("init", "--encryption", "keyfile", repo)
    return repo


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
