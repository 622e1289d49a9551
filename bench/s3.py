#!/usr/bin/python3
"""cbtfs on S3 vs cbtfs on a local directory, measured side by side.

  sudo /usr/bin/python3 bench/s3.py [--quick] [--rounds N] [--parts import,read,ingest]
                                    [--no-restart] [--keep]

Starts a single-node Ceph RADOS Gateway (tests/s3/rgw.py) under
/work/bench-tmp/s3/rgw, and measures, against the same data in a local
repository and in an S3 one:

  import  cbtfs-repo import of a full image and of a 5 % delta (MB/s of the
          image's size), and the S3 requests each committed point took
  read    sequential 4 MiB reads of the newest point through the mount:
          cold (fresh mount, page cache dropped, empty chunk cache, gateway
          restarted unless --no-restart) and warm (same mount, page cache
          dropped again: the S3 mount reads its local chunk cache)
  ingest  cbtfs-ingest from the XAPI simulator, full and 5 % incremental

and prints a Markdown table of medians with the ratio S3 / local. Every timed
read is checked against the source image. See bench/README.md.
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BUILD = os.path.join(ROOT, "build", "src")
WORK = "/work/bench-tmp/s3"
BUCKET = "cbtfs-bench"
BS = 4 << 20            # read size, and the hash's piece size
MIB = 1 << 20
DELTA_PCT = 5

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, BENCH)
import gen_image  # noqa: E402
import run as rb  # noqa: E402  (bench/run.py: mounts, readbench, the XAPI simulator)


def _load_rgw():
    """tests/s3/rgw.py, by its path: Ceph's python3-rgw also has a module named rgw."""
    spec = importlib.util.spec_from_file_location("cbtfs_test_rgw", os.path.join(ROOT, "tests", "s3", "rgw.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


Rgw = _load_rgw().Rgw

rb.WORK = WORK  # rb.Mount keeps its logs under WORK/logs, unmount_leftovers looks under WORK
BenchError, log, run, median = rb.BenchError, rb.log, rb.run, rb.median

REQUIRED = [("gcc", "gcc"), ("fusermount3", "fuse3"), ("ceph-mon", "ceph-mon"), ("ceph-osd", "ceph-osd"),
            ("radosgw", "radosgw"), ("ceph", "ceph-common"), ("nbdkit", "nbdkit"), ("cmp", "diffutils")]


@dataclass
class Sizes:
    image_mib: int
    ingest_mib: int
    rounds: int


FULL = Sizes(image_mib=2048, ingest_mib=2048, rounds=3)
QUICK = Sizes(image_mib=256, ingest_mib=256, rounds=1)


class Bin:
    """The cbtfs binaries, copied into WORK/bin at the start so that a rebuild
    during the run cannot mix versions."""
    cbtfs = os.path.join(BUILD, "cbtfs")
    repo = os.path.join(BUILD, "cbtfs-repo")
    ingest = os.path.join(BUILD, "cbtfs-ingest")
    readbench = None


# ---------------------------------------------------------------- helpers

def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


STATS_RE = re.compile(r"cbtfs: (\d+) S3 requests:((?: [A-Z]+ \d+)*)")


def s3_stats(text):
    """The last CBTFS_S3_STATS line in text: (total, "GET 13 PUT 3 ..."), or None."""
    found = STATS_RE.findall(text)
    if not found:
        return None
    total, detail = found[-1]
    return int(total), detail.strip()


def median_stats(stats):
    """Of several (total, detail) S3 stats, the middle one by total."""
    return sorted(stats)[(len(stats) - 1) // 2]


def timed(argv):
    """Runs a command; returns (seconds, stderr). Failure raises BenchError."""
    t = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    secs = time.monotonic() - t
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return secs, p.stderr


def warm(*files):
    for f in files:
        subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)


def point_time(k):
    """The --time of point k: fixed, so that two imports within one second are in order."""
    return rb.point_time(k).strftime("%Y-%m-%dT%H:%M:%SZ")


def seq_read(path):
    return rb.readbench(Bin, "seq", path, BS)


def tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class Backends:
    """Where repositories go: a local directory, or a prefix of the gateway's bucket."""

    def __init__(self, rgw, data):
        self.rgw, self.data = rgw, data
        os.makedirs(os.path.join(data, "repos"), exist_ok=True)
        self.s3 = rgw.client()

    def repo(self, backend, name):
        if backend == "local":
            return os.path.join(self.data, "repos", name)
        return f"s3://{BUCKET}/{name}"

    def new(self, backend, name):
        self.remove(backend, name)
        path = self.repo(backend, name)
        run([Bin.repo, "init", path])
        return path

    def _objects(self, name):
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=name + "/")
        return [o for page in pages for o in page.get("Contents", [])]

    def remove(self, backend, name):
        if backend == "local":
            shutil.rmtree(self.repo(backend, name), ignore_errors=True)
            return
        keys = [{"Key": o["Key"]} for o in self._objects(name)]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
        pages = self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=BUCKET, Prefix=name + "/")
        for page in pages:
            for u in page.get("Uploads", []):
                self.s3.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])

    def size(self, backend, name):
        if backend == "local":
            return tree_bytes(self.repo(backend, name))
        return sum(o["Size"] for o in self._objects(name))


def rgw_counters(rgw):
    """radosgw's own request counters (its admin socket's perf dump)."""
    perf = rgw._asok("client.rgw.s3", "perf dump").get("rgw", {})
    return {k: perf.get(k, 0) for k in ("req", "get", "get_b", "put", "put_b")}


# ---------------------------------------------------------------- results

@dataclass
class Row:
    part: str
    what: str
    unit: str
    local: float = None
    s3: float = None
    target: float = None     # S3/local must be >= this
    note: str = ""
    error: str = ""

    @property
    def ratio(self):
        if self.local is None or self.s3 is None or not self.local:
            return None
        return self.s3 / self.local

    def met(self):
        if self.target is None or self.ratio is None or self.error:
            return None
        return self.ratio >= self.target


def table(rows):
    lines = ["| part | measure | unit | local | S3 | S3/local | target | met | note |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.part} | {r.what} | | **ERROR** | | | | | {r.error} |")
            continue
        cells = [r.part, r.what, r.unit,
                 rb.fmt(r.local) if r.local is not None else "—",
                 rb.fmt(r.s3) if r.s3 is not None else "—",
                 rb.fmt(r.ratio) if r.ratio is not None else "",
                 f"≥ {r.target:g}" if r.target is not None else "",
                 {True: "yes", False: "**NO**", None: ""}[r.met()], r.note]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- data

class Data:
    """The image (base), the same image with DELTA_PCT % of its blocks
    rewritten (delta), and the readbench hash of delta at BS."""

    def __init__(self, d, mib):
        self.base = os.path.join(d, "base.raw")
        self.delta = os.path.join(d, "delta.raw")
        self.mib = mib
        self.bytes = mib * MIB
        self.vdi = rb.vdi_uuid("s3-bench")
        t = time.monotonic()
        log(f"generating a {mib} MiB image and a {DELTA_PCT} % delta of it ...")
        gen_image.base(self.base, mib, 1)
        run(["cp", "--sparse=always", self.base, self.delta])
        gen_image.delta(self.delta, DELTA_PCT, 2)
        self.delta_hash = seq_read(self.delta)["hash"]
        log(f"  done in {time.monotonic() - t:.1f} s")


# ---------------------------------------------------------------- parts

def part_import(ctx):
    """import: cbtfs-repo import of a full image, then of a 5 % delta.

    Into a new repository on each backend per round; the last round's
    repositories stay for the read part."""
    d, b = ctx.data, ctx.backends
    secs = {(k, be): [] for k in ("full", "delta") for be in ("local", "s3")}
    reqs = {"full": [], "delta": []}
    served = {"full": [], "delta": []}  # bytes the gateway sent back during each S3 import
    sizes = {}
    for r in range(ctx.rounds):
        for be in rb.rotated(["local", "s3"], r):
            name = f"import-r{r}"
            repo = b.new(be, name)
            for k, (kind, image) in enumerate((("full", d.base), ("delta", d.delta))):
                warm(image)
                c0 = rgw_counters(ctx.rgw)
                s, err = timed([Bin.repo, "import", "-q", "--vdi", d.vdi, "--time", point_time(k), repo, image])
                secs[(kind, be)].append(s)
                if be == "s3":
                    served[kind].append(rgw_counters(ctx.rgw)["get_b"] - c0["get_b"])
                    st = s3_stats(err)
                    if st is None:
                        raise BenchError(f"no CBTFS_S3_STATS line from cbtfs-repo import: {err.strip()[-300:]}")
                    reqs[kind].append(st)
                log(f"  [import] round {r + 1} {be} {kind}: {s:.2f} s, {d.bytes / s / 1e6:.0f} MB/s"
                    + (f", {reqs[kind][-1][0]} S3 requests ({reqs[kind][-1][1]}), gateway sent "
                       f"{served[kind][-1] / 1e6:.1f} MB" if be == "s3" else ""))
            sizes[be] = b.size(be, name)
            if r < ctx.rounds - 1:
                b.remove(be, name)
    ctx.read_repos = {be: b.repo(be, f"import-r{ctx.rounds - 1}") for be in ("local", "s3")}
    rows = []
    for kind, label in (("full", f"import of a {d.mib} MiB image into a new repository"),
                        ("delta", f"import of the same image with {DELTA_PCT} % of its blocks changed "
                                  "(2nd point)")):
        loc, s3 = median(secs[(kind, "local")]), median(secs[(kind, "s3")])
        rows.append(Row("import", label, "MB/s", d.bytes / loc / 1e6, d.bytes / s3 / 1e6,
                        note=f"local {loc:.2f} s, S3 {s3:.2f} s"))
    for kind in ("full", "delta"):
        total, detail = median_stats(reqs[kind])
        rows.append(Row("import", f"S3 requests for the {kind} point (one `cbtfs-repo import`)", "requests",
                        None, total, note=f"{detail}; GET bodies: {median(served[kind]) / 1e6:.1f} MB"))
    rows.append(Row("import", "repository size after both points", "MB", sizes["local"] / 1e6,
                    sizes["s3"] / 1e6, note="all files / all objects"))
    return rows


def part_read(ctx):
    """read: sequential 4 MiB reads of the newest point through the mount, cold and warm."""
    d = ctx.data
    if not getattr(ctx, "read_repos", None):
        # The import part was not run: make the same 2-point repositories.
        ctx.read_repos = {}
        for be in ("local", "s3"):
            repo = ctx.backends.new(be, "read")
            for k, image in enumerate((d.base, d.delta)):
                run([Bin.repo, "import", "-q", "--vdi", d.vdi, "--time", point_time(k), repo, image])
            ctx.read_repos[be] = repo
    s3_bytes = ctx.backends.size("s3", ctx.read_repos["s3"].split("/", 3)[3])
    cache_dir = os.path.join(WORK, "cache")
    mnt = os.path.join(WORK, "mnt", "cbtfs")
    os.makedirs(mnt, exist_ok=True)
    speed = {(k, be): [] for k in ("cold", "warm") for be in ("local", "s3")}
    warm_gets, cold_get_bytes, mount_reqs = [], [], []
    for r in range(ctx.rounds):
        for be in rb.rotated(["local", "s3"], r):
            argv = [Bin.cbtfs, "-f"]
            if be == "s3":
                shutil.rmtree(cache_dir, ignore_errors=True)
                os.makedirs(cache_dir)
                argv += ["-o", f"cache_dir={cache_dir}"]
                if ctx.restart:
                    # A restarted gateway has nothing in its OSD's cache: the
                    # cold read comes from the OSD's disk, as the local one does.
                    with rb.critical():
                        ctx.rgw.stop()
                        ctx.rgw.start()
            argv += [ctx.read_repos[be], mnt]
            drop_caches()
            image = os.path.join(mnt, d.vdi, "latest.raw")
            with rb.Mount(f"cbtfs-{be}-r{r}", argv, mnt) as m:
                c0 = rgw_counters(ctx.rgw)
                res = rb.checked(seq_read(image), d.delta_hash, f"{be} cold read")
                speed[("cold", be)].append(rb.mbps(res))
                c1 = rgw_counters(ctx.rgw)
                drop_caches()
                res = rb.checked(seq_read(image), d.delta_hash, f"{be} warm read")
                speed[("warm", be)].append(rb.mbps(res))
                c2 = rgw_counters(ctx.rgw)
                log_path = m.log_path
            if be == "s3":
                cold_get_bytes.append(c1["get_b"] - c0["get_b"])
                warm_gets.append(c2["get"] - c1["get"])
                with open(log_path, errors="replace") as f:
                    st = s3_stats(f.read())
                if st:
                    mount_reqs.append(st)
            log(f"  [read] round {r + 1} {be}: cold {speed[('cold', be)][-1]:.0f} MB/s, "
                f"warm {speed[('warm', be)][-1]:.0f} MB/s"
                + (f"; gateway GETs during the warm read: {warm_gets[-1]}, bytes served during the cold "
                   f"read: {cold_get_bytes[-1] / 1e6:.0f} MB" if be == "s3" else ""))
    what = f"seq 4 MiB reads of the newest point ({d.mib} MiB, 2-point chain) through the mount"
    note_cold = (f"S3: gateway served {median(cold_get_bytes) / 1e6:.0f} MB for it "
                 f"(repository {s3_bytes / 1e6:.0f} MB)")
    if mount_reqs:
        note_cold += "; S3 requests per mount (cold + warm): %d (%s)" % median_stats(mount_reqs)
    note_warm = f"S3: gateway GET requests during the warm read: {max(warm_gets)} (max of rounds)"
    if s3_bytes > 2048 * MIB:
        note_warm += "; the repository is larger than the 2048 MiB chunk cache"
    cold = "gateway restarted" if ctx.restart else "gateway not restarted"
    return [Row("read", f"COLD: {what}, fresh mount, page cache dropped, empty chunk cache, {cold}", "MB/s",
                median(speed[("cold", "local")]), median(speed[("cold", "s3")]), 0.5, note=note_cold),
            Row("read", "WARM: same, 2nd read on the same mount after dropping the page cache again "
                        "(S3: from the chunk cache file)", "MB/s",
                median(speed[("warm", "local")]), median(speed[("warm", "s3")]), 0.9, note=note_warm)]


def ingest(sim, repo, vdi):
    """Runs cbtfs-ingest; returns (its JSON summary of the VDI, S3 stats or None)."""
    p = subprocess.run([Bin.ingest, "--xapi", sim.info["url"], "--ca-file", sim.info["ca_file"],
                        "--password-file", sim.password, "--vdi", vdi, "--json", "-q", repo],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"cbtfs-ingest {repo} exited with {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    v = json.loads(p.stdout)["vdis"][0]
    if not v["ok"]:
        raise BenchError(f"ingest into {repo} failed: {v['error']}")
    return v, s3_stats(p.stderr)


def part_ingest(ctx):
    """ingest: cbtfs-ingest from the XAPI simulator, full then 5 % incremental.

    The simulator serves NBD with TLS; a new repository on each backend per
    round; each backend's newest point is restored and compared with the disk."""
    d, b = ctx.data, ctx.backends
    mib = ctx.s.ingest_mib
    sd = os.path.join(ctx.data_dir, "ingest")
    os.makedirs(sd, exist_ok=True)
    secs = {(k, be): [] for k in ("full", "incr") for be in ("local", "s3")}
    reqs = {"full": [], "incr": []}
    served = {"full": [], "incr": []}
    sim = rb.XapiSim(sd, mib * MIB)
    ctx.sim = sim
    try:
        disk = sim.disk()
        if mib == d.mib:
            run(["cp", "--sparse=always", d.base, disk["path"] + ".new"])
        else:
            gen_image.base(disk["path"] + ".new", mib, 1)
        os.replace(disk["path"] + ".new", disk["path"])
        for r in range(ctx.rounds):
            order = rb.rotated(["local", "s3"], r)
            repos = {be: b.new(be, f"ingest-r{r}") for be in order}
            for kind in ("full", "incr"):
                if kind == "incr":
                    gen_image.delta(disk["path"], DELTA_PCT, 100 + r)
                for be in order:
                    c0 = rgw_counters(ctx.rgw)
                    v, st = ingest(sim, repos[be], disk["uuid"])
                    if be == "s3":
                        served[kind].append(rgw_counters(ctx.rgw)["get_b"] - c0["get_b"])
                    if v["full"] != (kind == "full"):
                        raise BenchError(f"{be} ingest {kind}: full={v['full']} ({v.get('chain_reason', '')})")
                    secs[(kind, be)].append(v["seconds"])
                    if be == "s3" and st:
                        reqs[kind].append(st)
                    log(f"  [ingest] round {r + 1} {be} {kind}: {v['seconds']:.2f} s"
                        + (f", {st[0]} S3 requests ({st[1]}), gateway sent {served[kind][-1] / 1e6:.1f} MB"
                           if be == "s3" and st else ""))
            # Each backend's newest point must be the disk.
            for be in order:
                restored = os.path.join(sd, "restored.raw")
                run([Bin.repo, "restore", "--force", repos[be], disk["uuid"], "latest", restored])
                run(["cmp", restored, disk["path"]])
                os.unlink(restored)
                b.remove(be, f"ingest-r{r}")
    finally:
        sim.stop()
        ctx.sim = None
    rows = []
    for kind, label in (("full", f"full ingest of a {mib} MiB VDI over NBD with TLS"),
                        ("incr", f"incremental ingest, {DELTA_PCT} % of blocks changed")):
        loc, s3 = median(secs[(kind, "local")]), median(secs[(kind, "s3")])
        note = f"local {loc:.2f} s, S3 {s3:.2f} s (cbtfs-ingest's own timing)"
        if reqs[kind]:
            note += "; S3 requests: %d (%s); GET bodies: %.1f MB" % (*median_stats(reqs[kind]),
                                                                      median(served[kind]) / 1e6)
        rows.append(Row("ingest", label, "MB/s", mib * MIB / loc / 1e6, mib * MIB / s3 / 1e6, note=note))
    return rows


PARTS = {"import": part_import, "read": part_read, "ingest": part_ingest}


# ---------------------------------------------------------------- setup and main

class Ctx:
    pass


def missing_tools():
    missing = [f"{what} (Debian package {pkg})" for what, pkg in REQUIRED if not shutil.which(what)]
    try:
        import boto3  # noqa: F401
    except ImportError:
        missing.append("boto3 (Debian package python3-boto3)")
    for binary in (Bin.cbtfs, Bin.repo, Bin.ingest):
        if not os.access(binary, os.X_OK):
            missing.append(f"{binary} (build cbtfs first: meson setup build && meson compile -C build)")
    return missing


def install_binaries():
    bindir = os.path.join(WORK, "bin")
    os.makedirs(bindir, exist_ok=True)
    for attr in ("cbtfs", "repo", "ingest"):
        copy = os.path.join(bindir, os.path.basename(getattr(Bin, attr)))
        shutil.copy2(getattr(Bin, attr), copy)
        setattr(Bin, attr, copy)
    Bin.readbench = os.path.join(bindir, "readbench")
    run(["gcc", "-O3", "-march=native", "-Wall", "-o", Bin.readbench, os.path.join(BENCH, "readbench.c")])


def machine_info():
    fs = subprocess.run(["stat", "-f", "-c", "%T", WORK], capture_output=True, text=True).stdout.strip() or "?"
    return f"{rb.machine_info(Bin.cbtfs, ('radosgw', '--version'))}; {WORK} on {fs}"


def main():
    ap = argparse.ArgumentParser(description="cbtfs: S3 backend vs local directory")
    ap.add_argument("--quick", action="store_true", help=f"a {QUICK.image_mib} MiB image, 1 round")
    ap.add_argument("--rounds", type=int, help=f"rounds (default {FULL.rounds}, quick {QUICK.rounds})")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS))
    ap.add_argument("--no-restart", action="store_true",
                    help="do not restart the gateway before each cold S3 read (its OSD then serves from its cache)")
    ap.add_argument("--keep", action="store_true", help=f"keep {WORK}/data and the gateway's directory")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in parts if p not in PARTS]:
        sys.exit(f"unknown part(s): {', '.join(bad)}; parts are {', '.join(PARTS)}")
    parts = [p for p in PARTS if p in parts]  # import first: read uses its repositories
    if os.geteuid() != 0:
        sys.exit("run as root (it mounts FUSE file systems and drops the page cache): "
                 "sudo /usr/bin/python3 bench/s3.py")
    if missing := missing_tools():
        sys.exit("missing:\n  " + "\n  ".join(missing))
    sizes = QUICK if args.quick else FULL
    ctx = Ctx()
    ctx.s, ctx.rounds = sizes, args.rounds or sizes.rounds
    ctx.sim = None
    ctx.restart = not args.no_restart

    signal.signal(signal.SIGTERM, rb.on_signal)
    signal.signal(signal.SIGHUP, rb.on_signal)
    os.makedirs(WORK, exist_ok=True)
    rb.unmount_leftovers()
    rgw_dir = os.path.join(WORK, "rgw")
    if os.path.exists(os.path.join(rgw_dir, "rgw.json")):
        Rgw(rgw_dir).stop()  # left running by an interrupted run
    ctx.data_dir = os.path.join(WORK, "data")
    for d in (ctx.data_dir, rgw_dir, os.path.join(WORK, "cache"), os.path.join(WORK, "logs")):
        shutil.rmtree(d, ignore_errors=True)
    for d in ("logs", "mnt", "data", "rgw"):
        os.makedirs(os.path.join(WORK, d), exist_ok=True)
    need_gib = 3 if args.quick else 16
    free_gib = shutil.disk_usage(WORK).free / (1 << 30)
    if free_gib < need_gib:
        sys.exit(f"{WORK}: {free_gib:.1f} GiB free, this run needs about {need_gib} GiB")

    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    t_start = time.monotonic()
    rows, failed = [], False
    ctx.rgw = Rgw(rgw_dir, store="bluestore", size=32 << 30)
    try:
        install_binaries()
        t = time.monotonic()
        with rb.critical():
            ctx.rgw.start()
        log(f"gateway at {ctx.rgw.endpoint} up in {time.monotonic() - t:.1f} s")
        ctx.rgw.make_bucket(BUCKET)
        os.environ.update({"CBTFS_S3_ENDPOINT": ctx.rgw.endpoint, "AWS_REGION": ctx.rgw.region,
                           "AWS_ACCESS_KEY_ID": ctx.rgw.access_key,
                           "AWS_SECRET_ACCESS_KEY": ctx.rgw.secret_key, "CBTFS_S3_STATS": "1"})
        ctx.backends = Backends(ctx.rgw, ctx.data_dir)
        ctx.data = Data(ctx.data_dir, sizes.image_mib)
        for p in parts:
            fn = PARTS[p]
            log(f"{p}: {fn.__doc__.splitlines()[0]}")
            try:
                rows += fn(ctx)
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                failed = True
                log(f"{p} FAILED: {e}")
                rows.append(Row(p, fn.__doc__.splitlines()[0], "", error=str(e).replace("|", "/")[:300]))
    finally:
        for m in list(rb.Mount.active):
            m.stop()
        rb.unmount_leftovers()
        if ctx.sim is not None:
            ctx.sim.stop()
        with rb.critical():
            ctx.rgw.stop()
        if not args.keep:
            for d in (ctx.data_dir, rgw_dir, os.path.join(WORK, "cache")):
                shutil.rmtree(d, ignore_errors=True)

    missed = [r for r in rows if r.met() is False]
    report = "\n".join([
        f"## cbtfs on S3 vs local, {started:%Y-%m-%d %H:%M} UTC, {'quick' if args.quick else 'full'} run",
        "",
        f"Machine: {machine_info()}. Load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
        f"end; {time.monotonic() - t_start:.0f} s.",
        f"S3: a single-node Ceph RADOS Gateway on loopback (bluestore on a file under {WORK}). "
        f"Medians of {ctx.rounds} round(s); the backends alternate within each round. Every timed read was "
        "checked against the source image. MB/s = 10^6 bytes/s of the image's (virtual) size.",
        "",
        table(rows),
        "",
        " ".join(([f"Targets missed: {', '.join(r.what.split(':')[0] for r in missed)}."] if missed
                  else [] if failed else ["All targets met."])
                 + (["Some parts FAILED: see ERROR rows."] if failed else [])),
        "",
    ])
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
