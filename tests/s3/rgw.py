#!/usr/bin/python3
"""A real S3 endpoint for tests: a single-node Ceph RADOS Gateway on loopback.

One monitor, one OSD (bluestore on a sparse file, or memstore) and one
radosgw (beast frontend), all listening on 127.0.0.1 only, with every file
they touch (config, keyrings, run dir, admin sockets, logs, mon and OSD data)
under one state directory. No systemd, no mgr, nothing under /etc or /var.
Ports are chosen free at first start, so several instances can run side by
side, each in its own state directory.

    with Rgw(tmp_path / "rgw") as rgw:
        rgw.make_bucket("b")
        s3 = rgw.client()
        s3.put_object(Bucket="b", Key="k", Body=b"data")

Command line (the daemons outlive the command; a JSON line goes to stdout
and to DIR/rgw.json):

    rgw.py start DIR [--store bluestore|memstore] [--size BYTES]
    rgw.py stop DIR

A later start in the same directory keeps the endpoint and keys (and, with
bluestore, the data). Needs the Debian packages ceph-mon, ceph-osd, radosgw and
ceph-common; client() and make_bucket() need python3-boto3. Root is not
needed. See README.md beside this file.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid

START_TIMEOUT = 60
STOP_TIMEOUT = 15
REGION = "default"
RGW_NAME = "client.rgw.s3"
DEFAULT_SIZE = {"bluestore": 20 << 30, "memstore": 4 << 30}

# Stop order matters: radosgw waits on the OSD for in-flight requests, and the
# OSD tells the monitor it is going down, so each goes before what it needs.
DAEMONS = ("rgw", "osd", "mon")


def _free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (held open together so that
    they differ; the daemons bind them a few seconds later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cephx_key():
    """A new cephx secret in Ceph's encoding (what `ceph-authtool
    --gen-print-key` prints): u16 type 1 (AES), u32 seconds, u32 nanoseconds,
    u16 length 16, then 16 random bytes, all base64. Made here to save a
    process start per key."""
    now = time.time()
    raw = struct.pack("<HIIH", 1, int(now), int(now % 1 * 1e9), 16) + os.urandom(16)
    return base64.b64encode(raw).decode()


def _random_string(n, alphabet):
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _pid_alive(pid):
    """True if pid exists and is not a zombie (a zombie has exited; it only
    waits for a parent that may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"({e})"
    return "\n".join(text.splitlines()[-lines:])


class RgwError(RuntimeError):
    pass


class Rgw:
    """A single-node Ceph cluster with radosgw, rooted at state_dir.

    store: "bluestore" keeps objects in the sparse file state_dir/osd/block
    (size bytes, default 20 GiB; it must not fill up, see README.md) and
    survives stop() and start(); "memstore" keeps them in the OSD's memory
    (about twice what is stored; size caps the data, default 4 GiB), starts
    a little faster, and starts empty each time. In a directory that has
    rgw.json, store and size come from there, and so do the endpoint and
    keys.
    """

    def __init__(self, state_dir, store="bluestore", size=None):
        if store not in DEFAULT_SIZE:
            raise ValueError(f"store must be one of {sorted(DEFAULT_SIZE)}, not {store!r}")
        self.dir = os.path.abspath(os.fspath(state_dir))
        self.store = store
        self.size = size or DEFAULT_SIZE[store]
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.info_path = os.path.join(self.dir, "rgw.json")
        self.endpoint = self.access_key = self.secret_key = None
        self.region = REGION
        self.mon_port = self.rgw_port = None
        self.fsid = None
        self._procs = {}  # name -> Popen, for daemons this object started
        if os.path.exists(self.info_path):
            self._load_info()

    # -- public API ---------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        """Creates the cluster (or restarts it if state_dir has one) and
        returns once S3 requests with the keys succeed. On failure, stops
        whatever it started and raises RgwError with the logs' tails."""
        running = [d for d in DAEMONS if self._pid(d)]
        if running:
            raise RgwError(f"{self.dir}: {', '.join(running)} already running")
        deadline = time.monotonic() + timeout
        try:
            # A memstore OSD loses its data when it stops, so its cluster is
            # made anew each time (with the same endpoint and keys).
            if os.path.exists(self.info_path) and self.store == "bluestore":
                self._write_conf()  # paths may have moved with the directory
                self._spawn("mon", "ceph-mon", "-f", "-i", "a")
                self._start_osd_and_rgw(deadline)
                self._wait_s3(deadline, signed=True)
            else:
                self._create(deadline)
            tmp = self.info_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.info(), f)
                f.write("\n")
            os.replace(tmp, self.info_path)
        except BaseException as e:
            self.stop()
            if isinstance(e, RgwError):
                raise RgwError(f"{e}\n{self.logs()}") from None
            raise
        return self

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM radosgw, OSD, monitor, in this order, each waited for
        (SIGKILL after timeout seconds). Works on daemons started by another
        process too (through the pid files); idempotent."""
        for name in DAEMONS:
            pid = self._pid(name)
            proc = self._procs.pop(name, None)
            if pid:
                self._terminate(pid, proc, timeout)
            elif proc:
                proc.wait()  # already exited: reap it
            try:
                os.unlink(self._pid_path(name))
            except FileNotFoundError:
                pass

    def running(self):
        """Names of the daemons that are alive."""
        return [d for d in DAEMONS if self._pid(d)]

    def client(self, **config):
        """A boto3 S3 client for this gateway (path-style addressing, SigV4).
        Keyword arguments go to botocore.config.Config."""
        import boto3
        from botocore.config import Config

        cfg = {"s3": {"addressing_style": "path"}, "signature_version": "s3v4"}
        cfg.update(config)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, config=Config(**cfg))

    def signed_request(self, method, path, body=b"", headers=None):
        """A urllib.request.Request for path ("/bucket/key?query", already
        percent-encoded as S3 wants it) signed with AWS SigV4, for tests that
        want raw HTTP without boto3. The payload's SHA-256 goes in
        x-amz-content-sha256: radosgw answers 403 without that header."""
        url = urllib.parse.urlsplit(self.endpoint + path)
        now = time.gmtime()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", now)
        scope = f"{amz_date[:8]}/{self.region}/s3/aws4_request"
        hdrs = {k.lower(): str(v).strip() for k, v in (headers or {}).items()}
        hdrs.update({"host": url.netloc, "x-amz-date": amz_date,
                     "x-amz-content-sha256": hashlib.sha256(body).hexdigest()})
        signed = ";".join(sorted(hdrs))
        # Canonical query: sorted by name, "uploads" as "uploads=".
        query = sorted((p if "=" in p else p + "=" for p in url.query.split("&") if p),
                       key=lambda p: p.split("=", 1))
        canonical = "\n".join([method, url.path, "&".join(query),
                               "".join(f"{k}:{hdrs[k]}\n" for k in sorted(hdrs)), signed,
                               hdrs["x-amz-content-sha256"]])
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self.secret_key).encode()
        for part in (amz_date[:8], self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        hdrs["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                 f"SignedHeaders={signed}, Signature={sig}")
        del hdrs["host"]
        # urllib sends Content-Length only with data, and radosgw wants it on
        # every PUT (411 without), even an empty one.
        data = body if body or method in ("PUT", "POST") else None
        return urllib.request.Request(self.endpoint + path, data=data,
                                      headers=hdrs, method=method)

    def make_bucket(self, name):
        self.client().create_bucket(Bucket=name)
        return name

    def info(self):
        return {"endpoint": self.endpoint, "access_key": self.access_key,
                "secret_key": self.secret_key, "region": self.region,
                "store": self.store, "size": self.size, "state_dir": self.dir,
                "mon_port": self.mon_port, "rgw_port": self.rgw_port, "fsid": self.fsid}

    def logs(self, lines=40):
        """The last lines of each daemon's log (its own log and its stdio)."""
        out = []
        for name in DAEMONS:
            path = self._log_path(name)
            if os.path.exists(path):
                out.append(f"--- {path}\n{_tail(path, lines)}")
        return "\n".join(out)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- creation -----------------------------------------------------------

    def _create(self, deadline):
        self._wipe()
        os.makedirs(os.path.join(self.dir, "run"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "log"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "osd"), exist_ok=True)
        self.fsid = str(uuid.uuid4())
        if not os.path.exists(self.info_path):
            self.mon_port, self.rgw_port = _free_ports(2)
            self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
            self.access_key = _random_string(20, string.ascii_uppercase + string.digits)
            self.secret_key = _random_string(40, string.ascii_letters + string.digits)
        self._write_conf()

        # The clients' keys go into the monitor's initial auth database
        # along with its own, which saves a `ceph auth` round trip each. The
        # OSD gets its key later from `ceph osd new`, which wants to create it.
        admin = {"client.admin": (_cephx_key(), {"mon": "allow *", "osd": "allow *",
                                                 "mds": "allow *", "mgr": "allow *"})}
        rgw = {RGW_NAME: (_cephx_key(), {"mon": "allow rw", "osd": "allow rwx",
                                         "mgr": "allow rw"})}
        self._write_keyring("admin.keyring", admin)
        self._write_keyring("rgw.keyring", rgw)
        self._write_keyring("mkfs.keyring", {"mon.": (_cephx_key(), {"mon": "allow *"}),
                                             **admin, **rgw})

        monmap = os.path.join(self.dir, "monmap")
        self._run("monmaptool", "--create", "--fsid", self.fsid,
                  "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", monmap, conf=False)
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", os.path.join(self.dir, "mkfs.keyring"))
        os.unlink(monmap)
        os.unlink(os.path.join(self.dir, "mkfs.keyring"))
        self._spawn("mon", "ceph-mon", "-f", "-i", "a")

        osd_uuid = str(uuid.uuid4())
        osd_key = _cephx_key()
        out = self._run("ceph", "osd", "new", osd_uuid, "0", "-i", "-",
                        input=json.dumps({"cephx_secret": osd_key}), deadline=deadline)
        if out.strip() != "0":
            raise RgwError(f"ceph osd new gave id {out.strip()!r}, wanted 0")
        self._write_keyring(os.path.join("osd", "keyring"), {"osd.0": (osd_key, {})})
        self._run("ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid, deadline=deadline)
        self._start_osd_and_rgw(deadline)
        # After radosgw answers: both it and radosgw-admin create the default
        # zone if it is missing, and running them at once races.
        self._run("radosgw-admin", "user", "create", "--uid", "test", "--display-name", "test",
                  "--access-key", self.access_key, "--secret-key", self.secret_key,
                  deadline=deadline)
        self._wait_s3(deadline, signed=True)

    def _start_osd_and_rgw(self, deadline):
        self._spawn("osd", "ceph-osd", "-f", "-i", "0")
        # radosgw would also come up with the OSD still booting, but its first
        # write would then wait for the objecter's next tick (every 5 s) to be
        # sent again; a shorter tick makes radosgw slow to stop instead.
        while self._asok("osd.0", "status").get("state") != "active":
            self._check_alive()
            if time.monotonic() > deadline:
                raise RgwError("the OSD did not become active")
            time.sleep(0.02)
        self._spawn("rgw", "radosgw", "-f", "-n", RGW_NAME)
        self._wait_s3(deadline, signed=False)

    def _asok(self, daemon, prefix):
        """A command on a daemon's admin socket (the protocol of `ceph
        daemon`, without its process start): a JSON object, or {} if the
        socket does not answer yet."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(os.path.join(self.dir, "run", f"{daemon}.asok"))
                s.sendall(json.dumps({"prefix": prefix}).encode() + b"\0")
                data = b""
                while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                    chunk = s.recv(65536)
                    if not chunk:
                        return {}
                    data += chunk
            return json.loads(data[4:])
        except (OSError, ValueError):
            return {}

    def _wipe(self):
        """Removes what an earlier cluster left (only our own names)."""
        for name in ("mon", "osd", "run", "ceph.conf", "admin.keyring", "rgw.keyring",
                     "mkfs.keyring", "monmap"):
            path = os.path.join(self.dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)

    def _load_info(self):
        with open(self.info_path) as f:
            info = json.load(f)
        for k in ("endpoint", "access_key", "secret_key", "region", "store", "size",
                  "mon_port", "rgw_port", "fsid"):
            setattr(self, k, info[k])

    def _write_conf(self):
        d = self.dir
        store = {
            "bluestore": f"""\
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {self.size}
bluestore fsck on mkfs = false
# Closing the block device waits for the I/O thread's poll to time out, which
# happens several times during creation (default 250 ms).
bdev aio poll ms = 20
# The cache otherwise grows towards 4 GiB once tests have written a few GiB.
osd memory target = 1073741824""",
            "memstore": f"""\
osd objectstore = memstore
memstore device bytes = {self.size}""",
        }[self.store]
        text = f"""\
# Written by rgw.py; rewritten on each start.
[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
ms bind msgr1 = false
ms bind ipv6 = false
run dir = {d}/run
crash dir = {d}/crash
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# radosgw makes six pools.
mon max pg per osd = 1000
# Without these, each of the dozens of map changes at creation waits ~1 s
# and the cluster takes ~12.5 s instead of ~2 s to come up.
paxos propose interval = 0.05
paxos min wait = 0.01
# The monitor shuts itself down below 5 % free disk by default; tests should
# not depend on how full the host's disk is.
mon data avail crit = 0
mon data avail warn = 0
keyring = {d}/admin.keyring

[mon]
mon data = {d}/mon
keyring = {d}/mon/keyring
log file = {d}/log/mon.log
mon cluster log file = {d}/log/cluster.log
admin socket = {d}/run/$name.asok

[osd]
osd data = {d}/osd
keyring = {d}/osd/keyring
log file = {d}/log/osd.log
admin socket = {d}/run/$name.asok
public addr = 127.0.0.1
cluster addr = 127.0.0.1
{store}

[{RGW_NAME}]
keyring = {d}/rgw.keyring
rgw data = {d}/rgw
log file = {d}/log/rgw.log
admin socket = {d}/run/$name.asok
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
# A full OSD otherwise makes writes hang forever instead of failing.
rados osd op timeout = 10
# Deleted objects' data is otherwise kept for two hours.
rgw gc obj min wait = 60
rgw gc processor period = 60
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def _write_keyring(self, name, entities):
        """entities: {entity: (key, {service: caps})}."""
        lines = []
        for entity, (key, caps) in entities.items():
            lines.append(f"[{entity}]\n\tkey = {key}\n")
            lines += [f'\tcaps {svc} = "{cap}"\n' for svc, cap in caps.items()]
        path = os.path.join(self.dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(lines))

    # -- processes ----------------------------------------------------------

    def _run(self, *argv, input=None, conf=True, deadline=None):
        """Runs a tool to completion; returns its stdout, raises RgwError."""
        if conf:
            argv = (argv[0], "-c", self.conf) + argv[1:]
        timeout = 30 if deadline is None else max(1, deadline - time.monotonic())
        try:
            p = subprocess.run(argv, input=input, capture_output=True, text=True,
                               stdin=None if input is not None else subprocess.DEVNULL,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RgwError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
        if p.returncode != 0:
            raise RgwError(f"{' '.join(argv)} failed with {p.returncode}:\n{p.stdout}{p.stderr}")
        return p.stdout

    def _spawn(self, name, *argv):
        # A new session, so that a terminal's Ctrl-C reaches the test runner
        # (which then calls stop()) and not the daemons in mid-flight; stdio
        # goes to the log file, or pipes a caller holds would never close.
        argv = (argv[0], "-c", self.conf) + argv[1:]
        with open(self._log_path(name), "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[name] = proc
        with open(self._pid_path(name), "w") as f:
            f.write(f"{proc.pid}\n")

    def _pid_path(self, name):
        return os.path.join(self.dir, "run", f"{name}.pid")

    def _log_path(self, name):
        return os.path.join(self.dir, "log", f"{name}.log")

    def _pid(self, name):
        """The daemon's pid if it is alive and still ours: the pid file may
        be stale and the number reused, so the command line must name our
        config file."""
        try:
            with open(self._pid_path(name)) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if self.conf.encode() not in cmdline or not _pid_alive(pid):
            return None
        return pid

    def _terminate(self, pid, proc, timeout):
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            if proc is not None:
                try:
                    proc.wait(timeout=wait)
                    return
                except subprocess.TimeoutExpired:
                    continue
            # Not our child (started by another process): poll.
            end = time.monotonic() + wait
            while _pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.02)
            if not _pid_alive(pid):
                return
        raise RgwError(f"pid {pid} survived SIGKILL")

    def _check_alive(self):
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RgwError(f"{name} exited with status {proc.returncode}")

    def _wait_s3(self, deadline, signed):
        """Polls until radosgw answers GET / (anonymously, or with our keys:
        a list of our buckets), while checking that no daemon has died."""
        while True:
            self._check_alive()
            try:
                req = self.signed_request("GET", "/") if signed else self.endpoint + "/"
                urllib.request.urlopen(req, timeout=2).read()
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
            if time.monotonic() > deadline:
                raise RgwError(f"S3 at {self.endpoint} not ready ({last!r})")
            time.sleep(0.05)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="start (create or restart) the cluster in DIR")
    p.add_argument("dir")
    p.add_argument("--store", choices=sorted(DEFAULT_SIZE), default="bluestore")
    p.add_argument("--size", type=int, help="bluestore file or memstore size in bytes")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT)
    p = sub.add_parser("stop", help="stop the cluster in DIR")
    p.add_argument("dir")
    args = ap.parse_args(argv)
    if args.cmd == "start":
        os.makedirs(args.dir, exist_ok=True)
        try:
            rgw = Rgw(args.dir, store=args.store, size=args.size).start(timeout=args.timeout)
        except RgwError as e:
            print(e, file=sys.stderr)
            return 1
        # Popen objects are dropped without waiting: the daemons live on.
        print(json.dumps(rgw.info()), flush=True)
    else:
        Rgw(args.dir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
