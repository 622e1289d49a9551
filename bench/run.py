#!/usr/bin/python3
"""The cbtfs benchmark suite.

  sudo /usr/bin/python3 bench/run.py [--quick] [--rounds N] [--out bench/RESULTS.md]
                                     [--cases 1,2,...] [--keep]

Builds its helpers (readbench, passthrough_ll) and its data under
/work/bench-tmp/run, runs every case for several rounds with the tools
alternating, checks that every timed read returned the right bytes, and
prints a Markdown table of medians and ratios (cbtfs / reference). See
bench/README.md for the cases and what each number means.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import os
import ssl
import urllib.parse
import urllib.request
import xmlrpc.client
import random
import shutil
import signal
import statistics
import tempfile
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BUILD = os.path.join(ROOT, "build", "src")
CBTFS = os.path.join(BUILD, "cbtfs")
CBTFS_REPO = os.path.join(BUILD, "cbtfs-repo")
CBTFS_INGEST = os.path.join(BUILD, "cbtfs-ingest")
XAPI_SIM = os.path.join(ROOT, "tests", "xapi_sim", "xapi_sim.py")
WORK = "/work/bench-tmp/run"
FUSE_EXAMPLES = "/usr/share/doc/libfuse3-dev/examples"

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, BENCH)
import gen_image  # noqa: E402
import mount_probe  # noqa: E402

MIB = 1 << 20
BLOCK = 65536
ZERO_BLOCK = bytes(BLOCK)
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
RANDOM_SEED = 42

# (what must exist, the Debian package that brings it)
REQUIRED = [
    ("qemu-img", "qemu-utils"),
    ("qemu-storage-daemon", "qemu-system-common"),
    ("gcc", "gcc"),
    ("pkg-config", "pkg-config"),
    (os.path.join(FUSE_EXAMPLES, "passthrough_ll.c"), "libfuse3-dev"),
    ("fusermount3", "fuse3"),
    ("nbdkit", "nbdkit"),
    ("nbdcopy", "libnbd-bin"),
    ("lz4", "lz4"),
    ("cat", "coreutils"),
]


@dataclass
class Sizes:
    disk_mib: int           # cases 1, 2, 4, 8: the disk
    chain_points: int       # its points (full base + deltas)
    delta_pct: int          # % of its blocks rewritten per delta (also case 3)
    random_reads: int       # case 2
    long_chain: int         # case 3
    sparse_points: int      # case 5
    vdis: int               # case 6
    vdi_points: int
    growth_disk_mib: int    # case 9
    growth_delta_pct: int
    growth_lengths: list
    mount_points: list      # case 9, mount time
    rounds: int


FULL = Sizes(disk_mib=1024, chain_points=11, delta_pct=5, random_reads=20000, long_chain=101,
             sparse_points=100, vdis=100, vdi_points=30, growth_disk_mib=256, growth_delta_pct=2,
             growth_lengths=[1, 10, 100, 1000], mount_points=[10, 100, 1000], rounds=5)
QUICK = Sizes(disk_mib=128, chain_points=11, delta_pct=5, random_reads=2500, long_chain=101,
              sparse_points=100, vdis=25, vdi_points=15, growth_disk_mib=32, growth_delta_pct=2,
              growth_lengths=[1, 10, 100], mount_points=[10, 100], rounds=2)


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw):
    """Runs a command; its failure raises BenchError with its output."""
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} exited with {p.returncode}: "
                         f"{(p.stderr or p.stdout).strip()[-2000:]}")
    return p.stdout


def vdi_uuid(name):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cbtfs-bench/{name}"))


def point_time(k):
    return T0 + datetime.timedelta(hours=k)


def point_name(k):
    """The image name cbtfs shows for point k (0-based) imported by import_point."""
    return point_time(k).strftime("%Y-%m-%dT%H%M%SZ") + ".raw"


def import_point(repo, vdi, k, image):
    run([CBTFS_REPO, "import", "-q", "--vdi", vdi, "--time",
         point_time(k).strftime("%Y-%m-%dT%H:%M:%SZ"), repo, image])


def files_under(path):
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def tree_bytes(path):
    return sum(os.path.getsize(f) for f in files_under(path))


def warm(*paths):
    """Brings files (or every file under directories) into the host page cache."""
    files = [f for p in paths for f in files_under(p)]
    for i in range(0, len(files), 500):
        subprocess.run(["cat", *files[i:i + 500]], stdout=subprocess.DEVNULL, check=True)


def mounted(path):
    """Whether path is a mount point, from /proc/self/mountinfo (works for files too)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if "\\" in mp:
                mp = mp.encode().decode("unicode_escape")
            if mp == path:
                return True
    return False


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------- signals

_critical_depth = 0
_pending_signal = None


def on_signal(signum, _frame):
    """SIGTERM and SIGHUP end the run through SystemExit, so that every mount
    is cleaned up; inside a critical section only once it is left."""
    global _pending_signal
    if _critical_depth:
        _pending_signal = signum
    else:
        sys.exit(128 + signum)


@contextlib.contextmanager
def critical():
    """Starting a daemon and recording it, or stopping it, is not interrupted halfway."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth and _pending_signal:
            sys.exit(128 + _pending_signal)


# ---------------------------------------------------------------- mounts

class Mount:
    """A FUSE daemon run in the foreground: started on enter, polled until its
    mount point shows up (failing early if the daemon died, or at a
    deadline), and stopped on exit with fusermount3 -u, or with SIGTERM for
    qemu-storage-daemon (whose FUSE export is a regular file)."""

    active = []

    def __init__(self, name, argv, mountpoint, sigterm=False, deadline_s=30.0):
        self.name, self.argv, self.mountpoint = name, argv, mountpoint
        self.sigterm, self.deadline_s = sigterm, deadline_s
        self.proc = None
        self.mount_s = None
        self.log_path = os.path.join(WORK, "logs", f"{name}.log")

    def __enter__(self):
        with critical(), open(self.log_path, "ab") as logf:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)
            Mount.active.append(self)
        try:
            while not mounted(self.mountpoint):
                if self.proc.poll() is not None:
                    raise BenchError(f"{self.name} exited with status {self.proc.returncode} "
                                     f"before mounting {self.mountpoint}; see {self.log_path}")
                if time.monotonic() - t0 > self.deadline_s:
                    raise BenchError(f"{self.name} did not mount {self.mountpoint} "
                                     f"within {self.deadline_s} s; see {self.log_path}")
                time.sleep(0.001)
        except BaseException:
            self.stop()
            raise
        self.mount_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc):
        self.stop()

    def memory_mib(self):
        """(VmRSS, VmHWM) of the daemon in MiB."""
        vm = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    vm[line.split(":")[0]] = int(line.split()[1]) / 1024
        return vm["VmRSS"], vm["VmHWM"]

    def stop(self):
        with critical():
            self._stop()

    def _stop(self):
        if self.proc is None:
            return
        if self.sigterm:
            if self.proc.poll() is None:
                self.proc.terminate()
        else:
            for _ in range(50):  # busy for a moment after the last close
                if not mounted(self.mountpoint) or subprocess.run(
                        ["fusermount3", "-u", self.mountpoint], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        self.proc = None
        Mount.active.remove(self)


def cbtfs_mount(ctx, repo):
    mnt = ctx.mountpoint("cbtfs")
    return Mount("cbtfs", [CBTFS, "-f", repo, mnt], mnt)


def qsd_mount(ctx, top_qcow2):
    export = os.path.join(WORK, "mnt", "qsd-export.img")
    open(export, "a").close()
    return Mount("qemu-storage-daemon", [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={top_qcow2}",
        "--blockdev", "driver=qcow2,node-name=top,file=file0",
        "--export", f"type=fuse,id=exp0,node-name=top,mountpoint={export},writable=off",
    ], export, sigterm=True)


def passthrough_mount(ctx, source_dir):
    mnt = ctx.mountpoint("passthrough_ll")
    return Mount("passthrough_ll", [ctx.passthrough_ll, "-f", "-o", f"source={source_dir},cache=never", mnt],
                 mnt)


# ---------------------------------------------------------------- reading

def readbench(ctx, mode, path, bs=MIB, count=0, seed=RANDOM_SEED):
    """Runs readbench; returns dict(bytes, ops, secs, hash)."""
    argv = [ctx.readbench, mode, path, str(bs)] + ([str(count), str(seed)] if mode == "rand" else [])
    out = run(argv).split()
    r = dict(kv.split("=") for kv in out)
    return {"bytes": int(r["bytes"]), "ops": int(r["ops"]), "secs": float(r["secs"]), "hash": r["hash"]}


def checked(result, want_hash, what):
    if result["hash"] != want_hash:
        raise BenchError(f"WRONG DATA: {what} read hash {result['hash']}, the source image gives {want_hash}")
    return result


def mbps(r):
    return r["bytes"] / r["secs"] / 1e6


def ops_per_s(r):
    return r["ops"] / r["secs"]


def rotated(items, r):
    r %= len(items)
    return items[r:] + items[:r]


# ---------------------------------------------------------------- results

@dataclass
class Row:
    case: str
    what: str
    unit: str
    value: float = None
    ref_name: str = ""
    ref: float = None
    target: tuple = None      # ("ratio" | "value", ">=" | "<=" | "<" | "==", number)
    note: str = ""
    error: str = ""

    @property
    def ratio(self):
        if self.value is None or not self.ref:
            return None
        return self.value / self.ref

    def met(self):
        if not self.target or self.error:
            return None
        on, op, limit = self.target
        x = self.ratio if on == "ratio" else self.value
        if x is None:
            return None
        return {">=": x >= limit, "<=": x <= limit, "<": x < limit, "==": x == limit}[op]


def fmt(x):
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}".replace(",", " ")
    ax = abs(x)
    return f"{x:.0f}" if ax >= 100 else f"{x:.1f}" if ax >= 10 else f"{x:.2f}" if ax >= 1 else f"{x:.3f}"


def table(rows):
    lines = ["| # | measure | unit | cbtfs | reference | ref value | cbtfs/ref | target | met | note |",
             "|---|---|---|---:|---|---:|---:|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.case} | {r.what} | | **ERROR** | | | | | | {r.error} |")
            continue
        target = ""
        if r.target:
            on, op, limit = r.target
            sym = {">=": "≥", "<=": "≤", "<": "<", "==": "="}[op]
            target = f"{'ratio' if on == 'ratio' else 'cbtfs'} {sym} {limit:g}"
        met = {True: "yes", False: "**NO**", None: ""}[r.met()]
        cells = [r.case, r.what, r.unit, fmt(r.value), r.ref_name, fmt(r.ref) if r.ref is not None else "",
                 fmt(r.ratio) if r.ratio is not None else "", target, met, r.note]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- context and data sets

class Ctx:
    def __init__(self, sizes, rounds):
        self.s, self.rounds = sizes, rounds
        self.data = os.path.join(WORK, "data")
        self.readbench = os.path.join(WORK, "bin", "readbench")
        self.passthrough_ll = os.path.join(WORK, "bin", "passthrough_ll")
        self._sets = {}

    def dir(self, name):
        d = os.path.join(self.data, name)
        os.makedirs(d, exist_ok=True)
        return d

    def mountpoint(self, name):
        d = os.path.join(WORK, "mnt", name)
        os.makedirs(d, exist_ok=True)
        return d

    def dataset(self, name, builder):
        if name not in self._sets:
            t = time.monotonic()
            log(f"building data set {name} ...")
            self._sets[name] = builder(self)
            log(f"  {name} built in {time.monotonic() - t:.1f} s")
        return self._sets[name]


class Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


REPO_FORMAT = "1"  # --format
REPO_ENCRYPTION = "none"  # --encryption: every repository's (its passphrase in CBTFS_PASSPHRASE_FILE)


def new_repo(path):
    run([CBTFS_REPO, "init", "--format", REPO_FORMAT, "--encryption", REPO_ENCRYPTION, path])
    return path


def qcow2_overlay(state, prev, out):
    """A qcow2 overlay on prev holding only the 64 KiB clusters where state differs
    from prev: an empty overlay backed by state, rebased (safe mode, which
    compares the old and new backing) onto prev."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", state, "-F", "raw", out])
    run(["qemu-img", "rebase", "-q", "-b", prev, "-F", "qcow2", out])


class Lz4Reference:
    """Sum of the LZ4-compressed sizes of the 64 KiB blocks that each point
    changed (zero blocks cost nothing), the way cbtfs-repo import would store
    them: each block compressed alone, kept raw when that does not help. The
    lz4 tool's frame format with 64 KiB independent blocks does exactly that,
    plus 4 bytes per block and 11 bytes of frame, which are subtracted."""

    def __init__(self, scratch):
        self.scratch = scratch
        self.digests = []
        self.total = 0
        self.blocks = 0

    def point(self, image):
        changed = os.path.join(self.scratch, "changed.bin")
        n = 0
        digests = []
        with open(image, "rb") as f, open(changed, "wb") as out:
            i = 0
            while True:
                b = f.read(BLOCK)
                if not b:
                    break
                d = hashlib.blake2b(b, digest_size=16).digest()
                digests.append(d)
                if (i >= len(self.digests) or self.digests[i] != d) and b != ZERO_BLOCK[:len(b)]:
                    out.write(b)
                    n += 1
                i += 1
        self.digests = digests
        packed = changed + ".lz4"
        run(["lz4", "-q", "-f", "-1", "-B4", "--no-frame-crc", changed, packed])
        self.total += os.path.getsize(packed) - 11 - 4 * n
        self.blocks += n
        os.unlink(changed)
        os.unlink(packed)


def build_chain(ctx):
    """The disk of cases 1, 2, 4 and 8: a cbtfs VDI, a qcow2 chain and a raw
    file of its newest point."""
    s = ctx.s
    d = ctx.dir("chain")
    state = os.path.join(d, "state.raw")
    repo = new_repo(os.path.join(d, "repo"))
    vdi = vdi_uuid("chain")
    lz4 = Lz4Reference(d)
    gen_image.base(state, s.disk_mib, 1)
    qcow2 = []
    for k in range(s.chain_points):
        if k:
            gen_image.delta(state, s.delta_pct, 1000 + k)
        import_point(repo, vdi, k, state)
        q = os.path.join(d, f"p{k:02d}.qcow2")
        if k == 0:
            run(["qemu-img", "convert", "-O", "qcow2", state, q])
        else:
            qcow2_overlay(state, qcow2[-1], q)
        qcow2.append(q)
        lz4.point(state)
    pt_src = os.path.join(d, "pt-src")
    os.makedirs(pt_src)
    os.link(state, os.path.join(pt_src, "point.raw"))
    return Obj(dir=d, state=state, repo=repo, vdi=vdi, qcow2=qcow2, pt_src=pt_src, lz4=lz4,
               seq_hash=readbench(ctx, "seq", state)["hash"],
               rand_hash=readbench(ctx, "rand", state, 4096, s.random_reads)["hash"])


def build_long(ctx):
    """Case 3: one disk as a long chain, and its newest state as a 1-point chain."""
    s = ctx.s
    d = ctx.dir("long")
    state = os.path.join(d, "state.raw")
    repo = new_repo(os.path.join(d, "repo"))
    chain, flat = vdi_uuid("long-chain"), vdi_uuid("long-flat")
    gen_image.base(state, s.disk_mib, 3)
    for k in range(s.long_chain):
        if k:
            gen_image.delta(state, s.delta_pct, 3000 + k)
        import_point(repo, chain, k, state)
    import_point(repo, flat, 0, state)
    return Obj(repo=repo, chain=chain, flat=flat, seq_hash=readbench(ctx, "seq", state)["hash"])


def build_growth(ctx):
    """Case 9: one disk as a chain of max(growth_lengths) points; for each
    length L, the state at point L also as a 1-point chain of its own VDI."""
    s = ctx.s
    d = ctx.dir("growth")
    state = os.path.join(d, "state.raw")
    repo = new_repo(os.path.join(d, "repo"))
    chain = vdi_uuid("growth-chain")
    flats, hashes = {}, {}
    gen_image.base(state, s.growth_disk_mib, 9)
    for k in range(max(s.growth_lengths)):
        if k:
            gen_image.delta(state, s.growth_delta_pct, 9000 + k)
        import_point(repo, chain, k, state)
        if k + 1 in s.growth_lengths:
            flats[k + 1] = vdi_uuid(f"growth-flat-{k + 1}")
            import_point(repo, flats[k + 1], 0, state)
            hashes[k + 1] = readbench(ctx, "seq", state)["hash"]
    return Obj(repo=repo, chain=chain, flats=flats, hashes=hashes)


def build_sparse(ctx):
    """Cases 5 and 9: a 1 TiB sparse VDI with 64 random blocks, and 4 of 256
    fixed places rewritten per point (so the image's data stays small);
    copies of the repository at every point count needed."""
    s = ctx.s
    d = ctx.dir("sparse")
    image = os.path.join(d, "disk.raw")
    repo = new_repo(os.path.join(d, "repo"))
    vdi = vdi_uuid("sparse")
    wanted = sorted(set(s.mount_points) | {s.sparse_points})
    repos = {}
    places = random.Random(5).sample(range((1 << 40) // BLOCK), 256)
    gen_image.sparse(image, 1 << 20, 64, 5, places)
    for k in range(max(wanted)):
        if k:
            gen_image.scatter(image, 4, 5000 + k, places)
        import_point(repo, vdi, k, image)
        if k + 1 in wanted:
            repos[k + 1] = os.path.join(d, f"repo-{k + 1}")
            shutil.copytree(repo, repos[k + 1], symlinks=True)
    return Obj(vdi=vdi, repos=repos)


def build_many(ctx):
    """Case 6: many tiny VDIs (1 MiB disks) with many points each."""
    s = ctx.s
    d = ctx.dir("many")
    repo = new_repo(os.path.join(d, "repo"))

    def one(v):
        image = os.path.join(d, f"disk{v}.raw")
        vdi = vdi_uuid(f"many-{v}")
        gen_image.base(image, 1, 600 + v)
        for k in range(s.vdi_points):
            if k:
                gen_image.scatter(image, 2, 6000 + v * 1000 + k)
            import_point(repo, vdi, k, image)
        os.unlink(image)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(s.vdis)))
    return Obj(repo=repo)


# ---------------------------------------------------------------- cases

def peer_tools(ctx, c):
    """For the chain data set: tool name -> (mount it, its backing files, the
    image's path under the mount point)."""
    return {
        "cbtfs": (lambda: cbtfs_mount(ctx, c.repo), [c.repo], lambda m: os.path.join(m, c.vdi, "latest.raw")),
        "qemu-storage-daemon": (lambda: qsd_mount(ctx, c.qcow2[-1]), c.qcow2, lambda m: m),
        "passthrough_ll": (lambda: passthrough_mount(ctx, c.pt_src), [c.state],
                           lambda m: os.path.join(m, "point.raw")),
    }


def peer_rounds(ctx, c, tag, measure):
    """Runs measure(image path) -> number for every tool, each on a fresh
    mount with its backing files warm, the tools alternating; returns
    tool -> list of numbers."""
    tools = peer_tools(ctx, c)
    results = {t: [] for t in tools}
    for r in range(ctx.rounds):
        for t in rotated(list(tools), r):
            make, backing, image = tools[t]
            warm(*backing)
            with make() as m:
                results[t].append(measure(t, image(m.mountpoint)))
            log(f"  [{tag}] round {r + 1} {t}: {results[t][-1]:.0f}")
    return results


def peer_rows(case, what, unit, results):
    cb = median(results["cbtfs"])
    return [Row(case, what, unit, cb, "qemu-storage-daemon, qcow2 chain", median(results["qemu-storage-daemon"])),
            Row(case, "same, vs the FUSE ceiling", unit, cb, "passthrough_ll cache=never, raw file",
                median(results["passthrough_ll"]))]


def case_seq_peers(ctx):
    """1. Sequential 1 MiB reads of the newest point of an 11-point chain,
    first read after a fresh mount, backing files warm: cbtfs vs
    qemu-storage-daemon (qcow2 chain, FUSE export) vs passthrough_ll
    -o cache=never over a raw file of the same point."""
    c = ctx.dataset("chain", build_chain)
    speed = peer_rounds(ctx, c, "1 MB/s",
                        lambda t, image: mbps(checked(readbench(ctx, "seq", image), c.seq_hash, t)))
    what = f"seq 1 MiB reads, newest point of an {ctx.s.chain_points}-point chain, {ctx.s.disk_mib} MiB"
    return peer_rows("1", what, "MB/s", speed)


def case_random(ctx):
    """2. Random 4 KiB reads (fixed seed, the same offsets for every tool) of
    the same image, first reads after a fresh mount."""
    c = ctx.dataset("chain", build_chain)
    n = ctx.s.random_reads
    rate = peer_rounds(ctx, c, "2 reads/s",
                       lambda t, image: ops_per_s(checked(readbench(ctx, "rand", image, 4096, n), c.rand_hash, t)))
    return peer_rows("2", f"random 4 KiB reads, {n} offsets, same image", "reads/s", rate)


def case_long_chain(ctx):
    """3. Newest point of a long chain vs the same image as a 1-point chain."""
    c = ctx.dataset("long", build_long)
    speed = {c.chain: [], c.flat: []}
    for r in range(ctx.rounds):
        for vdi in rotated([c.chain, c.flat], r):
            warm(c.repo)
            with cbtfs_mount(ctx, c.repo) as m:
                res = checked(readbench(ctx, "seq", os.path.join(m.mountpoint, vdi, "latest.raw")), c.seq_hash,
                              "cbtfs")
            speed[vdi].append(mbps(res))
        log(f"  [3] round {r + 1}: chain {speed[c.chain][-1]:.0f}, flat {speed[c.flat][-1]:.0f} MB/s")
    return [Row("3", f"seq read, newest point of a {ctx.s.long_chain}-point chain, {ctx.s.disk_mib} MiB", "MB/s",
                median(speed[c.chain]), "same image as 1-point chain", median(speed[c.flat]),
                target=("ratio", ">=", 0.9))]


def case_reread(ctx):
    """4. Second sequential read of the same point without remounting (the
    kernel's page cache) vs the first."""
    c = ctx.dataset("chain", build_chain)
    first, second, local = [], [], []
    for r in range(ctx.rounds):
        warm(c.repo, c.state)
        with cbtfs_mount(ctx, c.repo) as m:
            image = os.path.join(m.mountpoint, c.vdi, "latest.raw")
            first.append(mbps(checked(readbench(ctx, "seq", image), c.seq_hash, "cbtfs 1st read")))
            second.append(mbps(checked(readbench(ctx, "seq", image), c.seq_hash, "cbtfs 2nd read")))
        local.append(mbps(checked(readbench(ctx, "seq", c.state), c.seq_hash, "local raw file")))
        log(f"  [4] round {r + 1}: 1st {first[-1]:.0f}, 2nd {second[-1]:.0f}, "
            f"local raw file {local[-1]:.0f} MB/s")
    return [Row("4", "seq read, 2nd read without remount (kernel page cache)", "MB/s", median(second),
                "1st read after mount", median(first), target=("ratio", ">=", 3),
                note=f"reader's ceiling (raw file in host page cache): {median(local):.0f} MB/s")]


def probe_rounds(ctx, repo, vdi, tag):
    """mount_probe.probe over the rounds: median ready time, median RSS, max peak RSS."""
    ready, rss, hwm = [], [], []
    mnt = ctx.mountpoint("cbtfs")
    for r in range(ctx.rounds):
        warm(repo)
        with open(os.path.join(WORK, "logs", "cbtfs.log"), "ab") as logf:
            p = mount_probe.probe(CBTFS, repo, mnt, vdi, 100, log=logf)
        ready.append(p["ready_s"])
        rss.append(p["rss_mib"])
        hwm.append(p["hwm_mib"])
        log(f"  [{tag}] round {r + 1}: {p['points']} points ready in {p['ready_s']:.3f} s, "
            f"RSS {p['rss_mib']:.1f} MiB")
    return median(ready), median(rss), max(hwm)


def case_mount_sparse(ctx):
    """5. Mount of a 1 TiB sparse VDI with 100 points until its newest image is
    readable, and the daemon's memory after 100 random 4 KiB reads."""
    c = ctx.dataset("sparse", build_sparse)
    n = ctx.s.sparse_points
    ready, rss, hwm = probe_rounds(ctx, c.repos[n], c.vdi, "5")
    return [
        Row("5", f"mount {n} points of a 1 TiB sparse VDI until latest.raw readable", "s", ready,
            target=("value", "<", 0.5)),
        Row("5", "daemon RSS after 100 random 4 KiB reads", "MiB", rss, target=("value", "<", 50),
            note=f"peak {hwm:.1f} MiB"),
    ]


def case_many_vdis(ctx):
    """6. ls -R of a mount of many small VDIs with many points each, and the
    daemon's memory after it."""
    c = ctx.dataset("many", build_many)
    secs, rss, mount_s, entries = [], [], [], 0
    for r in range(ctx.rounds):
        warm(c.repo)
        with cbtfs_mount(ctx, c.repo) as m:
            t = time.monotonic()
            out = run(["ls", "-R", m.mountpoint])
            secs.append(time.monotonic() - t)
            rss.append(m.memory_mib()[0])
            mount_s.append(m.mount_s)
            entries = sum(1 for line in out.splitlines() if line and not line.endswith(":"))
        log(f"  [6] round {r + 1}: ls -R {secs[-1]:.3f} s, {entries} entries, RSS {rss[-1]:.1f} MiB")
    what = f"{ctx.s.vdis} VDIs x {ctx.s.vdi_points} points"
    return [
        Row("6", f"ls -R of the mount, {what} ({entries} entries), fresh mount", "s", median(secs),
            target=("value", "<", 1), note=f"mounted in {median(mount_s):.3f} s before it"),
        Row("6", f"daemon RSS after ls -R, {what}", "MiB", median(rss), target=("value", "<", 100)),
    ]


class XapiSim:
    """The project's XAPI simulator with one VM and one disk, serving NBD with TLS."""

    def __init__(self, d, disk_bytes):
        # The simulated host keeps its disks in RAM: its snapshots are full
        # copies, and writing those back to the local disk would compete with
        # the tool being measured (a real host snapshots copy-on-write).
        self.dir = tempfile.mkdtemp(dir="/dev/shm", prefix="cbtfs-bench-sim-")
        cfg = os.path.join(d, "sim.json")
        with open(cfg, "w") as f:
            json.dump({"user": "root", "password": "bench", "nbd": "tls",
                       "vms": [{"name": "bench", "disks": [{"name": "disk", "size": disk_bytes}]}]}, f)
        self.proc = subprocess.Popen(["/usr/bin/python3", XAPI_SIM, "--state-dir", self.dir, "--config", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = os.path.join(self.dir, "ready.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the XAPI simulator did not start")
            time.sleep(0.05)
        self.info = json.load(open(ready))
        self.password = os.path.join(d, "password")
        with open(self.password, "w") as f:
            f.write("bench\n")

    def control(self, path):
        with urllib.request.urlopen(self.info["control"] + path, timeout=60) as r:
            return json.load(r)

    def disk(self):
        return next(v for v in self.control("/state")["vdis"] if not v["is_a_snapshot"])

    def nbd_uri(self, vdi_uuid, certdir):
        """An nbds:// URI for nbdcopy to the live disk's export, pinned like cbtfs pins."""
        proxy = xmlrpc.client.ServerProxy(self.info["url"],
                                          context=ssl.create_default_context(cafile=self.info["ca_file"]))
        session = proxy.session.login_with_password("root", "bench", "1.0", "bench")["Value"]
        ref = proxy.VDI.get_by_uuid(session, vdi_uuid)["Value"]
        info = proxy.VDI.get_nbd_info(session, ref)["Value"][0]
        os.makedirs(certdir, exist_ok=True)
        with open(os.path.join(certdir, "ca-cert.pem"), "w") as f:
            f.write(info["cert"])
        export = urllib.parse.quote(info["exportname"].lstrip("/"), safe="")
        return f"nbds://{info['address']}:{info['port']}/{export}?tls-certificates={certdir}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def ingest_seconds(sim, repo, vdi):
    """Runs cbtfs-ingest; returns its own timing of the VDI (changed-block
    query, NBD transfer and commit; the snapshot itself is the host's cost)."""
    out = run([CBTFS_INGEST, "--xapi", sim.info["url"], "--ca-file", sim.info["ca_file"], "--password-file",
               sim.password, "--vdi", vdi, "--json", "-q", repo])
    v = json.loads(out)["vdis"][0]
    if not v["ok"]:
        raise BenchError(f"ingest failed: {v['error']}")
    return v


def case_ingest(ctx):
    """7. Full ingest of a 4 GiB VDI (quick: 512 MiB) from nbdkit vs nbdcopy
    from the same nbdkit export to a local file; then a 5 % incremental
    ingest vs the full one. The stored point is compared with the disk."""
    mib = 4096 if ctx.s is FULL else 512
    d = ctx.dir("ingest")
    sim = XapiSim(d, mib * MIB)
    try:
        disk = sim.disk()
        run(["/usr/bin/python3", os.path.join(BENCH, "gen_image.py"), "base", disk["path"] + ".new", str(mib)])
        os.replace(disk["path"] + ".new", disk["path"])
        warm(disk["path"])
        full_rates, copy_rates, incr_times, full_times = [], [], [], []
        for r in range(ctx.rounds):
            repo = os.path.join(d, f"repo{r}")
            shutil.rmtree(repo, ignore_errors=True)
            new_repo(repo)
            # nbdcopy first in even rounds, ingest first in odd ones
            order = ["nbdcopy", "ingest"] if r % 2 == 0 else ["ingest", "nbdcopy"]
            for tool in order:
                if tool == "nbdcopy":
                    dst = os.path.join(d, "copy.raw")
                    uri = sim.nbd_uri(disk["uuid"], os.path.join(d, "certs"))
                    t = time.monotonic()
                    # --flush: durable like a committed point, or the
                    # comparison would be against the page cache
                    run(["nbdcopy", "--connections=4", "--flush", uri, dst])
                    copy_rates.append(mib * MIB / (time.monotonic() - t) / 1e6)
                    run(["cmp", dst, disk["path"]])
                    os.unlink(dst)
                else:
                    v = ingest_seconds(sim, repo, disk["uuid"])
                    full_times.append(v["seconds"])
                    full_rates.append(mib * MIB / v["seconds"] / 1e6)
            # 5 % of the blocks rewritten, then an incremental run
            run(["/usr/bin/python3", os.path.join(BENCH, "gen_image.py"), "delta", disk["path"], "5", str(100 + r)])
            v = ingest_seconds(sim, repo, disk["uuid"])
            if v["full"]:
                raise BenchError("the second ingest was not incremental: " + v["chain_reason"])
            incr_times.append(v["seconds"])
            restored = os.path.join(d, "restored.raw")
            run([CBTFS_REPO, "restore", "--force", repo, disk["uuid"], "latest", restored])
            run(["cmp", restored, disk["path"]])
            os.unlink(restored)
            shutil.rmtree(repo)
    finally:
        sim.stop()
    return [Row("7", f"full ingest of a {mib} MiB VDI over NBD with TLS (4 connections)", "MB/s", median(full_rates),
                "nbdcopy --connections=4 --flush from the same nbdkit to a local file", median(copy_rates),
                # format 2 also names every block by a keyed SHA-256: its target is the issue's
                ("ratio", ">=", 1.0 if REPO_FORMAT == "2" else 0.8),
                note="ingest time: changed-block query, transfer, compression, commit"),
            Row("7", "incremental ingest, 5 % of blocks changed", "s", median(incr_times),
                "full ingest of the same VDI", median(full_times), ("ratio", "<=", 0.1))]


def case_repo_size(ctx):
    """8. Repository size vs the sum of the LZ4-compressed changed blocks; and
    an all-zero image (written, not sparse) stores no block."""
    c = ctx.dataset("chain", build_chain)
    size = tree_bytes(c.repo)
    zero_dir = ctx.dir("zero")
    zero_image = os.path.join(zero_dir, "zero.raw")
    zero_mib = max(8, ctx.s.disk_mib // 16)
    with open(zero_image, "wb") as f:
        for _ in range(zero_mib * MIB // BLOCK):
            f.write(ZERO_BLOCK)
    zrepo = new_repo(os.path.join(zero_dir, "repo"))
    before = tree_bytes(zrepo)
    import_point(zrepo, vdi_uuid("zero"), 0, zero_image)
    point = json.loads(run([CBTFS_REPO, "ls", "--json", zrepo]))["vdis"][0]["points"][0]
    return [
        Row("8", f"repository bytes, {ctx.s.chain_points} points of {ctx.s.disk_mib} MiB "
                 f"({c.lz4.blocks} changed non-zero blocks)", "bytes", size,
            "sum of LZ4-compressed changed blocks", c.lz4.total, target=("ratio", "<=", 1.02)),
        Row("8", f"all-zero {zero_mib} MiB image (written, not sparse): data blocks stored", "blocks",
            point["blocks_written"], target=("value", "==", 0),
            note=f"{tree_bytes(zrepo) - before} bytes of index and manifest"),
    ]


def case_growth(ctx):
    """9. Growth: sequential MB/s of point L of an L-point chain vs the same
    image as a 1-point chain, and mount time for more and more points."""
    g = ctx.dataset("growth", build_growth)
    rows = []
    for length in ctx.s.growth_lengths:
        chain_img = os.path.join(g.chain, point_name(length - 1))
        flat_img = os.path.join(g.flats[length], "latest.raw")
        speed = {chain_img: [], flat_img: []}
        for r in range(ctx.rounds):
            for img in rotated([chain_img, flat_img], r):
                warm(g.repo)
                with cbtfs_mount(ctx, g.repo) as m:
                    res = checked(readbench(ctx, "seq", os.path.join(m.mountpoint, img)), g.hashes[length],
                                  "cbtfs")
                speed[img].append(mbps(res))
        log(f"  [9] chain length {length}: {median(speed[chain_img]):.0f} vs 1-point "
            f"{median(speed[flat_img]):.0f} MB/s")
        rows.append(Row("9", f"seq read, point {length} of a {length}-point chain, {ctx.s.growth_disk_mib} MiB, "
                             f"{ctx.s.growth_delta_pct} % per delta", "MB/s",
                        median(speed[chain_img]), "same image as 1-point chain", median(speed[flat_img])))
    s = ctx.dataset("sparse", build_sparse)
    base = None
    for n in ctx.s.mount_points:
        ready, rss, _ = probe_rounds(ctx, s.repos[n], s.vdi, "9")
        base = base or ready
        rows.append(Row("9", f"mount until readable, {n} points of a 1 TiB sparse VDI", "s", ready,
                        f"{ctx.s.mount_points[0]} points", base, note=f"RSS {rss:.1f} MiB"))
    return rows


CASES = {
    "1": case_seq_peers,
    "2": case_random,
    "3": case_long_chain,
    "4": case_reread,
    "5": case_mount_sparse,
    "6": case_many_vdis,
    "7": case_ingest,
    "8": case_repo_size,
    "9": case_growth,
}


# ---------------------------------------------------------------- setup and main

def missing_tools():
    missing = []
    for what, package in REQUIRED:
        found = os.path.exists(what) if what.startswith("/") else shutil.which(what)
        if not found:
            missing.append(f"{what} (Debian package {package})")
    if shutil.which("pkg-config") and subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        missing.append("pkg-config fuse3 (Debian package libfuse3-dev)")
    for binary in (CBTFS, CBTFS_REPO):
        if not os.access(binary, os.X_OK):
            missing.append(f"{binary} (build cbtfs first: meson setup build && meson compile -C build)")
    return missing


def build_helpers():
    """Compiles readbench and passthrough_ll, and copies the cbtfs binaries
    into WORK/bin, so that a rebuild during the run cannot change them."""
    global CBTFS, CBTFS_REPO, CBTFS_INGEST
    bindir = os.path.join(WORK, "bin")
    os.makedirs(bindir, exist_ok=True)
    copies = []
    for binary in (CBTFS, CBTFS_REPO, CBTFS_INGEST):
        copy = os.path.join(bindir, os.path.basename(binary))
        shutil.copy2(binary, copy)
        run([copy, "--version"])
        copies.append(copy)
    CBTFS, CBTFS_REPO, CBTFS_INGEST = copies
    run(["gcc", "-O3", "-march=native", "-Wall", "-o", os.path.join(bindir, "readbench"),
         os.path.join(BENCH, "readbench.c")])
    src = os.path.join(WORK, "build-passthrough")
    os.makedirs(src, exist_ok=True)
    for f in ("passthrough_ll.c", "passthrough_helpers.h"):
        shutil.copy(os.path.join(FUSE_EXAMPLES, f), src)
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).split()
    run(["gcc", "-O2", "-w", "-o", os.path.join(bindir, "passthrough_ll"),
         os.path.join(src, "passthrough_ll.c"), *flags])


def unmount_leftovers():
    """Unmounts whatever an earlier, interrupted run left mounted under WORK."""
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f]
    for mp in mps:
        if mp.startswith(WORK + "/"):
            log(f"unmounting leftover {mp}")
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


def machine_info(cbtfs=CBTFS, peer=("qemu-storage-daemon", "--version")):
    """One line: CPU, memory, OS, the cbtfs binary and commit, and the peer tool's version."""
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return "?"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / MIB
    debian = open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?"
    commit = first(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM; Debian {debian}, Linux {os.uname().release}; "
            f"{first([cbtfs, '-V'])}, commit {commit}; {first(list(peer))}")


def main():
    ap = argparse.ArgumentParser(description="cbtfs benchmark suite")
    ap.add_argument("--quick", action="store_true", help="sizes about 8x smaller, 2 rounds")
    ap.add_argument("--rounds", type=int, help="rounds per case (default 5, quick 2)")
    ap.add_argument("--out", help="append the results in Markdown to this file")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case numbers (default all)")
    ap.add_argument("--keep", action="store_true", help=f"keep the data under {WORK}/data")
    ap.add_argument("--format", default="1", choices=["1", "2"], help="repository format of cbtfs's repositories")
    ap.add_argument("--encryption", default="none", choices=["none", "passphrase"],
                    help="encrypt cbtfs's repositories (format 2)")
    args = ap.parse_args()
    global REPO_FORMAT, REPO_ENCRYPTION
    REPO_FORMAT = args.format
    REPO_ENCRYPTION = args.encryption
    if REPO_ENCRYPTION != "none":
        passphrase = os.path.join(WORK, "passphrase")
        os.makedirs(WORK, exist_ok=True)
        with open(passphrase, "w") as f:
            f.write("bench passphrase\n")
        os.environ["CBTFS_PASSPHRASE_FILE"] = passphrase  # every cbtfs process the run starts inherits it
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if bad := [c for c in cases if c not in CASES]:
        sys.exit(f"unknown case(s): {', '.join(bad)}; cases are {', '.join(CASES)}")
    if os.geteuid() != 0:
        sys.exit("run as root (it mounts FUSE file systems): sudo /usr/bin/python3 bench/run.py")
    if missing := missing_tools():
        sys.exit("missing:\n  " + "\n  ".join(missing) +
                 "\ninstall: apt-get install qemu-utils qemu-system-common libfuse3-dev fuse3 gcc pkg-config "
                 "libnbd-bin nbdkit lz4")
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes.rounds
    ctx = Ctx(sizes, rounds)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    os.makedirs(WORK, exist_ok=True)
    unmount_leftovers()
    shutil.rmtree(ctx.data, ignore_errors=True)
    for d in ("logs", "mnt", "data"):
        os.makedirs(os.path.join(WORK, d), exist_ok=True)
    need_gib = 3 if args.quick else 25
    free_gib = shutil.disk_usage(WORK).free / (1 << 30)
    if free_gib < need_gib:
        sys.exit(f"{WORK}: {free_gib:.1f} GiB free, the {'quick' if args.quick else 'full'} run needs "
                 f"about {need_gib} GiB")

    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    t_start = time.monotonic()
    rows, failed = [], False
    try:
        build_helpers()
        for c in cases:
            fn = CASES[c]
            log(f"case {c}: {fn.__doc__.splitlines()[0]}")
            try:
                rows += fn(ctx)
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                failed = True
                log(f"case {c} FAILED: {e}")
                rows.append(Row(c, fn.__doc__.splitlines()[0], "", error=str(e).replace("|", "/")[:300]))
    finally:
        for m in list(Mount.active):
            m.stop()
        unmount_leftovers()
        if not args.keep:
            shutil.rmtree(ctx.data, ignore_errors=True)

    missed = [r for r in rows if r.met() is False]
    report = "\n".join([
        f"## cbtfs benchmark, {started:%Y-%m-%d %H:%M} UTC, {'quick' if args.quick else 'full'} run",
        "",
        f"Machine: {machine_info()}. Load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"{time.monotonic() - t_start:.0f} s.",
        f"Medians of {rounds} round(s); tools alternate within each round; every read is the first after a "
        "fresh mount (except case 4's second) with the backing files warm in the host page cache; every "
        "timed read was checked against the source image. MB/s = 10^6 bytes/s.",
        "",
        table(rows),
        "",
        (f"Targets missed: {', '.join(f'case {r.case} ({r.what})' for r in missed)}." if missed
         else "All targets met.") + (" Some cases FAILED: see ERROR rows." if failed else ""),
        "",
    ])
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
