#!/usr/bin/python3
"""XAPI simulator for the cbtfs integration tests and demo.

Speaks XenServer's XML-RPC API over HTTPS for the calls cbtfs makes
(sessions; VM, VBD, VDI and SR records; snapshots; changed block tracking;
NBD export info; data_destroy; tasks and Async calls; raw imports), serves
VDI data over NBD with real nbdkit processes (TLS or not), and offers a
plain-HTTP JSON control API with which a test acts as the guest (writes into a
disk), as the administrator (resizes a disk, disables CBT) or as a faulty host
(fails or stalls calls, drops NBD connections, fails imports). See README.md
beside this file.

The invariant that matters: changed-block bitmaps are computed from the data.
Every snapshot taken with CBT enabled keeps a SHA-1 per 64 KiB block (also
after data_destroy); list_changed_blocks compares two such lists and ORs in
the blocks the control API wrote in between (real CBT reports rewrites of
identical data too), so a bitmap never misses a change, whatever wrote it.

Python 3 standard library only; needs the openssl and nbdkit programs.
Usage: xapi_sim.py --state-dir DIR --config CONFIG.json [--port 0] [--control-port 0]
"""

import argparse
import base64
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

BLOCK = 64 * 1024                       # CBT granularity
SECTOR = 512                            # virtual sizes and NBD reads are multiples of this
NULL_REF = "OpaqueRef:NULL"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)   # XAPI's "never"
CBT_SR_TYPES = frozenset({"ext", "file", "nfs", "smb", "lvm", "lvhd", "lvmoiscsi", "lvmohba"})
NBD_MODES = ("tls", "insecure", "none")
NBD_CONNECTION_LIMIT = 16               # xapi-nbd's connection_limit (ocaml/nbd/lib/consts.ml), per host
IN_USE_WAIT = 4.0                       # seconds destroy/data_destroy wait for NBD clients, as XAPI
NBD_START_TIMEOUT = 10.0
LOGIN = "session.login_with_password"


def log(message):
    t = time.time()
    sys.stderr.write(f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03} xapi_sim: {message}\n")
    sys.stderr.flush()


class XapiError(Exception):
    """An API failure, answered as {Status: Failure, ErrorDescription: [code, params...]}."""

    def __init__(self, code, *params):
        super().__init__(code)
        self.description = [code, *(str(p) for p in params)]


class HttpError(Exception):
    """A request answered with a bare HTTP status (malformed XML-RPC, bad upload, control errors);
    error_info is what an import's task reports for it."""

    def __init__(self, status, message, error_info=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_info = list(error_info or ["INTERNAL_ERROR", message])


class UploadFailed(HttpError):
    """An upload that stopped partway; what it wrote (extents: (offset, length)) is in the VDI."""

    def __init__(self, status, message, extents):
        super().__init__(status, message)
        self.extents = list(extents)


# ----------------------------------------------------------------------------
# XML-RPC, encoded the non-strict way XAPI does

def parse_method_call(body):
    """Returns (method name, [params]) of an XML-RPC methodCall; HttpError 500 if malformed."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise HttpError(500, f"malformed XML: {e}")
    name = (root.findtext("methodName") or "").strip()
    if root.tag != "methodCall" or not name:
        raise HttpError(500, "not an XML-RPC methodCall")
    return name, [parse_value(p.find("value")) for p in root.findall("params/param")]


def parse_value(elem):
    """Decodes one <value>: untyped text is a string; typed ints become ints."""
    if elem is None:
        raise HttpError(500, "a param without a value")
    if len(elem) == 0:
        return elem.text or ""
    typed = elem[0]
    text = typed.text or ""
    try:
        if typed.tag in ("string", "dateTime.iso8601"):
            return text
        if typed.tag in ("i4", "int", "i8"):
            return int(text.strip())
        if typed.tag == "boolean":
            return text.strip() == "1"
        if typed.tag == "double":
            return float(text)
        if typed.tag == "base64":
            return base64.b64decode(text)
    except ValueError as e:
        raise HttpError(500, f"bad <{typed.tag}> value: {e}")
    if typed.tag == "nil":
        return None
    if typed.tag == "struct":
        return {m.findtext("name"): parse_value(m.find("value")) for m in typed.findall("member")}
    if typed.tag == "array":
        return [parse_value(v) for v in typed.findall("data/value")]
    raise HttpError(500, f"unknown XML-RPC type <{typed.tag}>")


def encode_value(v):
    """Encodes like XAPI: strings, refs, enums and ints as bare <value>text</value>."""
    if isinstance(v, bool):
        return f"<value><boolean>{int(v)}</boolean></value>"
    if v is None:
        return "<value></value>"
    if isinstance(v, (str, int)):
        return f"<value>{escape(str(v))}</value>"
    if isinstance(v, float):
        return f"<value><double>{v!r}</double></value>"
    if isinstance(v, datetime):
        return f"<value><dateTime.iso8601>{v.strftime('%Y%m%dT%H:%M:%SZ')}</dateTime.iso8601></value>"
    if isinstance(v, dict):
        members = "".join(f"<member><name>{escape(k)}</name>{encode_value(x)}</member>" for k, x in v.items())
        return f"<value><struct>{members}</struct></value>"
    if isinstance(v, (list, tuple)):
        return f"<value><array><data>{''.join(encode_value(x) for x in v)}</data></array></value>"
    raise TypeError(f"cannot encode {type(v).__name__}")


def method_response(result):
    return f"<methodResponse><params><param>{encode_value(result)}</param></params></methodResponse>".encode()


# ----------------------------------------------------------------------------
# Certificates (openssl CLI): one CA, one server certificate for HTTPS and NBD

@dataclass
class Certificates:
    ca_file: str
    cert_file: str
    key_file: str
    nbd_dir: str        # ca-cert.pem, server-cert.pem, server-key.pem as nbdkit wants them

    @functools.cached_property
    def cert_pem(self):
        with open(self.cert_file) as f:
            return f.read()


def openssl(*args):
    p = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"xapi_sim: openssl {args[0]} failed: {p.stderr.strip()}")


MAX_HOSTS = 16


def host_address(index):
    """Host i of the pool listens on its own loopback address: 127.0.0.1 is the master."""
    return f"127.0.0.{index + 1}"


def make_certificates(state_dir):
    """Creates the CA and the server certificate (localhost and every host's address) unless
    state_dir has them."""
    p = functools.partial(os.path.join, state_dir)
    certs = Certificates(p("ca.pem"), p("server.pem"), p("server-key.pem"), p("nbd-tls"))
    if not all(os.path.exists(f) for f in (certs.ca_file, certs.cert_file, certs.key_file)):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                "-subj", "/CN=cbtfs XAPI simulator CA", "-keyout", p("ca-key.pem"), "-out", certs.ca_file,
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                "-keyout", certs.key_file, "-out", p("server.csr"))
        with open(p("server-ext.cnf"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost," +
                    ",".join(f"IP:{host_address(i)}" for i in range(MAX_HOSTS)) + "\n")
        openssl("x509", "-req", "-in", p("server.csr"), "-CA", certs.ca_file, "-CAkey", p("ca-key.pem"),
                "-CAcreateserial", "-days", "825", "-extfile", p("server-ext.cnf"), "-out", certs.cert_file)
    os.makedirs(certs.nbd_dir, exist_ok=True)
    for src, name in ((certs.ca_file, "ca-cert.pem"), (certs.cert_file, "server-cert.pem"),
                      (certs.key_file, "server-key.pem")):
        shutil.copyfile(src, os.path.join(certs.nbd_dir, name))
    return certs


def self_signed(state_dir, stem, name):
    """A self-signed certificate naming only the host name (no address), as
    a host on a dedicated backup network has; returns (cert file, key file)."""
    cert, key = os.path.join(state_dir, f"{stem}.pem"), os.path.join(state_dir, f"{stem}-key.pem")
    if not os.path.exists(cert):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "825", "-subj", f"/CN={name}",
                "-keyout", key, "-out", cert, "-addext", f"subjectAltName=DNS:{name}")
    return cert, key


def use_nbd_host_name(certs, state_dir, name, pin):
    """config nbd_host_name: nbdkit presents a certificate for that name only;
    get_nbd_info hands out that certificate (or, with nbd_pin "other", one of
    another key for the same name: a server that is not the host)."""
    cert, key = self_signed(state_dir, "nbd-named", name)
    certs.nbd_dir = os.path.join(state_dir, "nbd-tls-named")
    os.makedirs(certs.nbd_dir, exist_ok=True)
    for src, dst in ((cert, "ca-cert.pem"), (cert, "server-cert.pem"), (key, "server-key.pem")):
        shutil.copyfile(src, os.path.join(certs.nbd_dir, dst))
    handed_out = self_signed(state_dir, "nbd-other", name)[0] if pin == "other" else cert
    with open(handed_out) as f:
        return f.read()


# ----------------------------------------------------------------------------
# Block digests and bitmaps

def block_count(size):
    return (size + BLOCK - 1) // BLOCK


@functools.lru_cache(maxsize=None)
def zero_digest(length):
    return hashlib.sha1(bytes(length)).digest()


def data_extents(fd, size):
    """Yields (start, end) of the regions of a file that may hold data; holes are skipped."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:      # no SEEK_DATA here: everything may be data
                yield pos, size
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def scan_blocks(path, size, copy_to=None):
    """SHA-1 of each 64 KiB block of the first `size` bytes of `path` (bytes past its end
    read as zeros); with copy_to, also writes a sparse copy of those bytes there."""
    count = block_count(size)
    has_data = bytearray(count)
    digests = []
    with open(path, "rb") as src:
        for start, end in data_extents(src.fileno(), size):
            has_data[start // BLOCK:(end - 1) // BLOCK + 1] = b"\1" * ((end - 1) // BLOCK + 1 - start // BLOCK)
        dst = os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if copy_to else None
        try:
            for i in range(count):
                length = min(BLOCK, size - i * BLOCK)
                if not has_data[i]:
                    digests.append(zero_digest(length))
                    continue
                data = os.pread(src.fileno(), length, i * BLOCK).ljust(length, b"\0")
                digests.append(hashlib.sha1(data).digest())
                if dst is not None and data.count(0) != length:
                    os.pwrite(dst, data, i * BLOCK)
            if dst is not None:
                os.ftruncate(dst, size)
        finally:
            if dst is not None:
                os.close(dst)
    return digests


def encode_bitmap(blocks, count):
    """Base64 of the bitmap, one bit per block, most significant bit first."""
    bits = bytearray((count + 7) // 8)
    for i in blocks:
        bits[i // 8] |= 0x80 >> (i % 8)
    return base64.b64encode(bytes(bits)).decode()


# ----------------------------------------------------------------------------
# The host's objects

def new_uuid():
    return str(uuidlib.uuid4())


def new_ref():
    return f"OpaqueRef:{new_uuid()}"


def ref_of(obj):
    return obj.ref if obj is not None else NULL_REF


def now():
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass(eq=False)
class PoolHost:
    """A host of the pool: XML-RPC and xapi-nbd on its own loopback address."""
    CLASS = "host"
    name_label: str
    address: str
    is_master: bool = False
    uuid: str = field(default_factory=new_uuid)
    ref: str = field(default_factory=new_ref)


@dataclass(eq=False)
class Sr:
    CLASS = "SR"
    name_label: str
    type: str
    host: "PoolHost | None" = None      # the host whose local storage it is; None: shared by the pool
    uuid: str = field(default_factory=new_uuid)
    ref: str = field(default_factory=new_ref)

    @property
    def supports_cbt(self):
        return self.type in CBT_SR_TYPES


@dataclass(eq=False)
class Vm:
    CLASS = "VM"
    name_label: str
    uuid: str = field(default_factory=new_uuid)
    ref: str = field(default_factory=new_ref)
    is_a_snapshot: bool = False
    snapshot_of: "Vm | None" = None
    snapshot_time: datetime = EPOCH
    is_control_domain: bool = False
    is_template: bool = False
    host: "PoolHost | None" = None      # resident_on
    tags: list = field(default_factory=list)

    # A normal VM runs until the control API's /power_state says otherwise.
    state: str = "Running"

    @property
    def power_state(self):
        return "Halted" if self.is_a_snapshot or self.is_template else self.state


@dataclass(eq=False)
class Vbd:
    CLASS = "VBD"
    vm: Vm
    vdi: "Vdi | None"       # None: an empty CD drive
    type: str               # "Disk" or "CD"
    userdevice: str
    uuid: str = field(default_factory=new_uuid)
    ref: str = field(default_factory=new_ref)

    @property
    def currently_attached(self):
        # A suspended VM's disks are unplugged; a paused one's stay plugged.
        return self.vm.power_state in ("Running", "Paused")


@dataclass(eq=False)
class Vdi:
    CLASS = "VDI"
    name_label: str
    sr: Sr
    virtual_size: int
    path: "str | None" = None           # the data file; None once data_destroy'ed
    type: str = "user"
    uuid: str = field(default_factory=new_uuid)
    ref: str = field(default_factory=new_ref)
    read_only: bool = False
    sharable: bool = False
    other_config: dict = field(default_factory=dict)
    is_a_snapshot: bool = False
    snapshot_of: "Vdi | None" = None
    snapshot_time: datetime = EPOCH
    cbt_chain: "str | None" = None      # live: current CBT chain id; snapshot: the chain it was taken in
    digests: "list | None" = None       # snapshot with CBT: SHA-1 per block when it was taken
    seq: int = 0                        # snapshot: the host's clock when it was taken
    write_log: list = field(default_factory=list)   # live: (clock, first block, last block) of control writes

    @property
    def cbt_enabled(self):
        return self.cbt_chain is not None

    @property
    def origin(self):
        """The live VDI this one is (a snapshot of)."""
        return self.snapshot_of if self.is_a_snapshot else self


TASK_DONE = frozenset({"success", "failure", "cancelled"})
CHUNK_HEADER = struct.Struct("<QI")     # import_raw_vdi chunked=true: {offset: uint64; len: uint32}, LE
MIB = 1 << 20
IO_ERROR = ("VDI_IO_ERROR", "Device I/O errors")    # what XAPI puts in a task when vhd-tool fails


@dataclass(eq=False)
class Task:
    """An XAPI task: made by an Async.* call or by task.create, finished once (TaskHelper's
    complete/failed change only a pending task), kept until task.destroy or expiry."""
    CLASS = "task"
    name_label: str
    name_description: str = ""
    uuid: str = field(default_factory=new_uuid)
    ref: str = field(default_factory=new_ref)
    status: str = "pending"
    progress: float = 0.0
    result: str = ""                    # the XML-RPC serialisation of the value, "" until success
    error_info: list = field(default_factory=list)
    created: datetime = field(default_factory=now)
    finished: datetime = EPOCH          # XAPI's "never" until the task ends
    destroy_requested: bool = False     # task.destroy while pending: it goes when it ends, as in XAPI

    @property
    def done(self):
        return self.status in TASK_DONE


def unrelated(reason="Source and target VDI are unrelated"):
    return XapiError("SR_BACKEND_FAILURE_460", "", reason, "")


# ----------------------------------------------------------------------------
# get_all_records_where: XAPI's filter language (ocaml/database/db_filter_lex.mll,
# db_filter_parse.mly). An expression compares values, each a "literal" or a
# field "name" of the database row, with =, combined by and, or (one precedence,
# left to right), not (tighter) and parentheses; true and false stand alone.

FILTER_TOKEN = re.compile(r'\s*(?:(=)|(\()|(\))|"([^"]*)"|(true|false|field|and|or|not))')


def parse_filter(text):
    """The expression as nested tuples; XapiError INTERNAL_ERROR if it does not parse."""
    tokens, pos = [], 0
    while pos < len(text.rstrip(" \t\n")):
        m = FILTER_TOKEN.match(text, pos)
        if m is None:
            raise XapiError("INTERNAL_ERROR", f"Db_filter.Expression_error: cannot read {text[pos:]!r}")
        eq, lp, rp, ident, word = m.groups()
        tokens.append(("ident", ident) if ident is not None else (eq or lp or rp or word, None))
        pos = m.end()
    tokens.append(("eof", None))
    at = 0

    def take(kind=None):
        nonlocal at
        tok = tokens[at]
        if kind is not None and tok[0] != kind:
            raise XapiError("INTERNAL_ERROR", f"Db_filter.Expression_error: unexpected {tok[0]} in {text!r}")
        at += 1
        return tok

    def value():
        if tokens[at][0] == "field":
            take()
            return ("field", take("ident")[1])
        return ("literal", take("ident")[1])

    def unary():
        kind = tokens[at][0]
        if kind == "not":
            take()
            return ("not", unary())
        if kind in ("true", "false"):
            take()
            return (kind,)
        if kind == "(":
            take()
            inner = expr()
            take(")")
            return inner
        left = value()
        take("=")
        return ("eq", left, value())

    def expr():
        left = unary()
        while tokens[at][0] in ("and", "or"):
            left = (take()[0], left, unary())
        return left

    tree = expr()
    take("eof")
    return tree


def db_field(record, ref, name):
    """A field of a database row as XAPI marshals it: name_label is name__label there, and
    every row has its ref as _ref."""
    if name == "_ref":
        return ref
    key = name.replace("__", "_")
    if key not in record:
        raise XapiError("INTERNAL_ERROR", f"Db_exn.DBCache_NotFound(\"missing field\", {name!r})")
    v = record[key]
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else str(v)


class Row:
    """A database row for a filter: the fields a filter usually names are read from the
    object; the whole record is made only when another is named, or for the answer."""
    QUICK = {"uuid": lambda o: o.uuid, "name_label": lambda o: o.name_label}
    QUICK_BY_CLASS = {"VBD": {"VM": lambda o: o.vm.ref, "VDI": lambda o: ref_of(o.vdi)},
                      "VDI": {"snapshot_of": lambda o: ref_of(o.snapshot_of)},
                      "VM": {"snapshot_of": lambda o: ref_of(o.snapshot_of)}}

    def __init__(self, model, obj):
        self.model, self.obj, self._record = model, obj, None
        self.quick = {**self.QUICK, **self.QUICK_BY_CLASS.get(obj.CLASS, {})}

    def record(self):
        if self._record is None:
            self._record = self.model.record(self.obj)
        return self._record

    def __contains__(self, key):
        return key in self.quick or key in self.record()

    def __getitem__(self, key):
        return self.quick[key](self.obj) if key in self.quick else self.record()[key]


def eval_filter(tree, record, ref):
    op = tree[0]
    if op in ("true", "false"):
        return op == "true"
    if op == "not":
        return not eval_filter(tree[1], record, ref)
    if op == "and":
        return eval_filter(tree[1], record, ref) and eval_filter(tree[2], record, ref)
    if op == "or":
        return eval_filter(tree[1], record, ref) or eval_filter(tree[2], record, ref)
    side = [v if kind == "literal" else db_field(record, ref, v) for kind, v in tree[1:]]
    return side[0] == side[1]


class Model:
    """The objects of one simulated host, with XAPI's and its storage manager's rules.
    Not thread-safe: callers hold the host lock."""

    def __init__(self, vdi_dir):
        self.vdi_dir = vdi_dir
        self.objects = {}       # ref -> SR, VM, VBD or VDI, in creation order
        self.seq = 0            # clock ticking at each snapshot and guest write

    # -- lookup --------------------------------------------------------------

    def add(self, obj):
        self.objects[obj.ref] = obj
        return obj

    def all(self, cls):
        return [o for o in self.objects.values() if o.CLASS == cls]

    def get(self, cls, ref):
        obj = self.objects.get(ref) if isinstance(ref, str) else None
        if obj is None or obj.CLASS != cls:
            raise XapiError("HANDLE_INVALID", cls, ref)
        return obj

    def by_uuid(self, cls, uuid):
        found = next((o for o in self.all(cls) if o.uuid == uuid), None)
        if found is None:
            raise XapiError("UUID_INVALID", cls, uuid)
        return found

    def vbds(self, *, vm=None, vdi=None):
        return [b for b in self.all("VBD") if (vm is None or b.vm is vm) and (vdi is None or b.vdi is vdi)]

    def snapshots(self, obj):
        return [o for o in self.all(obj.CLASS) if o.snapshot_of is obj]

    def hosts(self):
        return self.all("host")

    def master(self):
        return self.hosts()[0]

    def sr(self, sr_type, host=None):
        """The SR of that type local to host (the master by default), or the pool's shared one
        (host None is given as shared=True)."""
        found = next((s for s in self.all("SR") if s.type == sr_type and s.host is host), None)
        if found:
            return found
        if host is None:
            name = f"Shared storage ({sr_type})"
        else:
            name = "Local storage" if sr_type == "ext" else f"Local storage ({sr_type})"
            if not host.is_master:
                name += f" on {host.name_label}"
        return self.add(Sr(name_label=name, type=sr_type, host=host))

    def hosts_of(self, sr):
        """The hosts that see an SR (have its PBD plugged): its own host, or every host."""
        return [sr.host] if sr.host is not None else self.hosts()

    # -- records -------------------------------------------------------------

    def record(self, obj):
        return getattr(self, f"_{obj.CLASS.lower()}_record")(obj)

    def _sr_record(self, sr):
        vdis = [v for v in self.all("VDI") if v.sr is sr]
        return {"uuid": sr.uuid, "name_label": sr.name_label, "name_description": "", "type": sr.type,
                "content_type": "iso" if sr.type == "iso" else "user", "shared": sr.host is None,
                "VDIs": [v.ref for v in vdis], "PBDs": [],
                "virtual_allocation": sum(v.virtual_size for v in vdis), "physical_size": 1 << 40,
                "physical_utilisation": sum(self._allocated(v) for v in vdis),
                "allowed_operations": [], "current_operations": {}, "other_config": {}, "sm_config": {},
                "tags": []}

    def _vm_record(self, vm):
        return {"uuid": vm.uuid, "name_label": vm.name_label, "name_description": "",
                "power_state": vm.power_state, "is_a_template": vm.is_a_snapshot or vm.is_template,
                "is_default_template": False, "is_a_snapshot": vm.is_a_snapshot,
                "snapshot_of": ref_of(vm.snapshot_of), "snapshots": [s.ref for s in self.snapshots(vm)],
                "snapshot_time": vm.snapshot_time, "is_control_domain": vm.is_control_domain,
                "VBDs": [b.ref for b in self.vbds(vm=vm)], "allowed_operations": [],
                "current_operations": {}, "other_config": {}, "tags": list(vm.tags),
                "resident_on": ref_of(vm.host) if vm.power_state == "Running" else NULL_REF,
                "affinity": ref_of(vm.host)}

    def _host_record(self, host):
        return {"uuid": host.uuid, "name_label": host.name_label, "name_description": "",
                "hostname": host.name_label, "address": host.address, "enabled": True,
                "resident_VMs": [vm.ref for vm in self.all("VM") if vm.host is host and vm.power_state == "Running"],
                "control_domain": next(vm.ref for vm in self.all("VM") if vm.is_control_domain and vm.host is host),
                "PBDs": [], "allowed_operations": [], "current_operations": {}, "other_config": {}, "tags": []}

    def _vbd_record(self, vbd):
        disk = vbd.type == "Disk"
        return {"uuid": vbd.uuid, "VM": vbd.vm.ref, "VDI": ref_of(vbd.vdi),
                "device": f"xvd{chr(ord('a') + int(vbd.userdevice))}" if vbd.currently_attached else "",
                "userdevice": vbd.userdevice, "bootable": disk and vbd.userdevice == "0",
                "mode": "RW" if disk else "RO", "type": vbd.type, "empty": vbd.vdi is None,
                "currently_attached": vbd.currently_attached, "unpluggable": False, "storage_lock": False,
                "allowed_operations": [], "current_operations": {}, "other_config": {}}

    def _vdi_record(self, vdi):
        return {"uuid": vdi.uuid, "name_label": vdi.name_label, "name_description": "",
                "SR": vdi.sr.ref, "VBDs": [b.ref for b in self.vbds(vdi=vdi)],
                "virtual_size": vdi.virtual_size, "physical_utilisation": self._allocated(vdi),
                "type": vdi.type, "sharable": vdi.sharable, "read_only": vdi.read_only,
                "is_a_snapshot": vdi.is_a_snapshot, "snapshot_of": ref_of(vdi.snapshot_of),
                "snapshots": [s.ref for s in self.snapshots(vdi)], "snapshot_time": vdi.snapshot_time,
                "cbt_enabled": vdi.cbt_enabled, "location": vdi.uuid, "managed": True, "missing": False,
                "parent": NULL_REF, "storage_lock": False, "on_boot": "persist", "allow_caching": False,
                "is_tools_iso": False, "metadata_of_pool": NULL_REF, "metadata_latest": False,
                "allowed_operations": [], "current_operations": {}, "other_config": vdi.other_config,
                "sm_config": {}, "xenstore_data": {}, "crash_dumps": [], "tags": []}

    def _task_record(self, task):
        return {"uuid": task.uuid, "name_label": task.name_label, "name_description": task.name_description,
                "allowed_operations": [],
                "current_operations": {"task": "destroy"} if task.destroy_requested else {},
                "created": task.created, "finished": task.finished, "status": task.status,
                "progress": task.progress, "type": "<none/>", "result": task.result,
                "error_info": task.error_info, "other_config": {}, "subtask_of": NULL_REF, "subtasks": []}

    @staticmethod
    def _allocated(vdi):
        return os.stat(vdi.path).st_blocks * 512 if vdi.path else 0

    # -- creation ------------------------------------------------------------

    def load(self, config):
        """Builds the hosts with their control domains and the configured VMs with their disks."""
        for i, name in enumerate(config["hosts"]):
            host = self.add(PoolHost(name_label=name, address=host_address(i), is_master=i == 0))
            dom0 = self.add(Vm(name_label=f"Control domain on host: {name}", is_control_domain=True, host=host))
            if config.get("control_domain_disk"):
                # A disk plugged into dom0 (as an NBD transfer or a backup tool leaves one):
                # a VM with disks that no backup may select.
                vdi = self.create_vdi(self.sr("ext", host), f"dom0 disk on {name}", config["control_domain_disk"])
                self.add(Vbd(vm=dom0, vdi=vdi, type="Disk", userdevice="0"))
        by_name = {h.name_label: h for h in self.hosts()}
        for vm_cfg in config["vms"]:
            host = by_name[vm_cfg.get("host", self.master().name_label)]
            vm = self.add(Vm(name_label=vm_cfg["name"], uuid=vm_cfg.get("uuid") or new_uuid(), host=host,
                             is_template=bool(vm_cfg.get("template")), tags=list(vm_cfg.get("tags", []))))
            disks = vm_cfg.get("disks", [])
            for i, disk in enumerate(disks):
                sr = self.sr(disk.get("sr_type", "ext"), None if disk.get("shared") else host)
                vdi = self.create_vdi(sr, disk["name"], disk["size"], uuid=disk.get("uuid") or new_uuid())
                if disk.get("cbt"):
                    vdi.cbt_chain = new_uuid()
                self.add(Vbd(vm=vm, vdi=vdi, type="Disk", userdevice=str(i)))
            if vm_cfg.get("cd") == "iso":
                iso = self.create_vdi(self.sr("iso", host), f"{vm_cfg['name']}.iso", MIB, read_only=True)
                self.add(Vbd(vm=vm, vdi=iso, type="CD", userdevice=str(max(3, len(disks)))))
            elif vm_cfg.get("cd"):
                self.add(Vbd(vm=vm, vdi=None, type="CD", userdevice=str(max(3, len(disks)))))

    def create_vdi(self, sr, name, size, uuid=None, **fields):
        vdi = Vdi(name_label=name, sr=sr, virtual_size=size, uuid=uuid or new_uuid(), **fields)
        vdi.path = self._path(vdi)
        with open(vdi.path, "ab"):
            pass
        os.truncate(vdi.path, size)
        return self.add(vdi)

    def _path(self, vdi):
        return os.path.join(self.vdi_dir, f"{vdi.uuid}.raw")

    def snapshot_vdi(self, vdi, when):
        """A snapshot of a live VDI: a copy of its data, and its block digests if CBT is on."""
        if vdi.type == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi.ref, "cbt_metadata")
        if vdi.is_a_snapshot:
            raise XapiError("OPERATION_NOT_ALLOWED", f"the simulator does not snapshot snapshots: {vdi.ref}")
        snap = Vdi(name_label=vdi.name_label, sr=vdi.sr, virtual_size=vdi.virtual_size, type=vdi.type,
                   read_only=vdi.read_only, sharable=vdi.sharable, other_config=dict(vdi.other_config),
                   is_a_snapshot=True, snapshot_of=vdi, snapshot_time=when, cbt_chain=vdi.cbt_chain)
        snap.path = self._path(snap)
        digests = scan_blocks(vdi.path, vdi.virtual_size, copy_to=snap.path)
        if snap.cbt_enabled:
            snap.digests = digests
        self.seq += 1
        snap.seq = self.seq
        return self.add(snap)

    def snapshot_vm(self, vm, name, ignore_vdis):
        """A snapshot VM: one snapshot VDI per disk VBD; CD VBDs are copied, not snapshotted."""
        if vm.is_a_snapshot or vm.is_control_domain:
            raise XapiError("OPERATION_NOT_ALLOWED", f"cannot snapshot {vm.ref}")
        when = now()
        snap = self.add(Vm(name_label=name, is_a_snapshot=True, snapshot_of=vm, snapshot_time=when, host=vm.host))
        for vbd in self.vbds(vm=vm):
            vdi = vbd.vdi
            if vbd.type == "Disk":
                if vdi is None or vdi.ref in ignore_vdis:
                    continue
                vdi = self.snapshot_vdi(vdi, when)
            self.add(Vbd(vm=snap, vdi=vdi, type=vbd.type, userdevice=vbd.userdevice))
        return snap

    # -- destruction ---------------------------------------------------------

    def destroy_vm(self, vm):
        """Destroys a snapshot VM record and its VBDs; its VDIs stay."""
        if not vm.is_a_snapshot:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VM is not a snapshot: {vm.ref}")
        for vbd in self.vbds(vm=vm):
            del self.objects[vbd.ref]
        del self.objects[vm.ref]

    def check_data_destroy(self, vdi):
        if not vdi.sr.supports_cbt:
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", vdi.sr.ref)
        if not vdi.is_a_snapshot:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi.ref}")
        if not vdi.cbt_enabled:
            raise XapiError("VDI_NO_CBT_METADATA", vdi.ref)
        if any(b.currently_attached for b in self.vbds(vdi=vdi)):
            raise XapiError("VDI_IN_USE", vdi.ref, "data_destroy")

    def data_destroy(self, vdi):
        """Drops a snapshot's data, keeping its CBT metadata; its VBDs go, as in XAPI."""
        self._drop_data(vdi)
        vdi.type = "cbt_metadata"

    def check_destroy(self, vdi):
        if any(b.currently_attached for b in self.vbds(vdi=vdi)):
            raise XapiError("VDI_IN_USE", vdi.ref, "destroy")

    def destroy_vdi(self, vdi):
        self._drop_data(vdi)
        del self.objects[vdi.ref]

    def _drop_data(self, vdi):
        if vdi.path:
            os.unlink(vdi.path)
            vdi.path = None
        for vbd in self.vbds(vdi=vdi):
            del self.objects[vbd.ref]

    # -- changed block tracking ----------------------------------------------

    def _check_cbt_operation(self, vdi):
        if not vdi.sr.supports_cbt:
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", vdi.sr.ref)
        if vdi.type == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi.ref, "cbt_metadata")
        if vdi.is_a_snapshot:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {vdi.ref}")
        if vdi.type not in ("user", "system"):
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi.ref, vdi.type)

    def enable_cbt(self, vdi):
        self._check_cbt_operation(vdi)
        if not vdi.cbt_enabled:
            vdi.cbt_chain = new_uuid()

    def disable_cbt(self, vdi):
        self._check_cbt_operation(vdi)
        vdi.cbt_chain = None

    def check_changed_blocks(self, vdi_from, vdi_to):
        """Raises the error XAPI gives when no bitmap can be computed between the two."""
        for v in (vdi_from, vdi_to):
            if not v.sr.supports_cbt:
                raise XapiError("SR_OPERATION_NOT_SUPPORTED", v.sr.ref)
        if vdi_from is vdi_to:
            raise unrelated("Source and target VDI are same")
        if not vdi_from.is_a_snapshot or vdi_from.origin is not vdi_to.origin:
            raise unrelated()
        for v in (vdi_from, vdi_to):
            if not v.cbt_enabled:
                raise XapiError("VDI_NO_CBT_METADATA", v.ref)
        if vdi_from.cbt_chain != vdi_to.cbt_chain or vdi_from.seq >= self._clock_of(vdi_to):
            raise unrelated()

    def changed_blocks(self, vdi_from, vdi_to):
        """The base64 bitmap of the blocks that differ between two points of one CBT chain,
        plus those the guest wrote in between; sized by vdi_to."""
        self.check_changed_blocks(vdi_from, vdi_to)
        digests = vdi_to.digests if vdi_to.is_a_snapshot else scan_blocks(vdi_to.path, vdi_to.virtual_size)
        old = vdi_from.digests
        changed = {i for i, d in enumerate(digests) if i >= len(old) or old[i] != d}
        upto = self._clock_of(vdi_to)
        for seq, first, last in vdi_from.origin.write_log:
            if vdi_from.seq < seq <= upto:
                changed.update(range(first, min(last, len(digests) - 1) + 1))
        return encode_bitmap(changed, len(digests))

    @staticmethod
    def _clock_of(vdi):
        return vdi.seq if vdi.is_a_snapshot else math.inf

    # -- the guest and the administrator -------------------------------------

    def guest_write(self, vdi, offset, data):
        """Writes into a VDI's data and logs the blocks touched, as a guest write would."""
        if offset < 0 or offset + len(data) > vdi.virtual_size:
            raise HttpError(400, f"write of {len(data)} bytes at {offset} is outside the "
                                 f"{vdi.virtual_size}-byte VDI")
        if not data:
            return
        fd = os.open(vdi.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.log_write(vdi, offset, len(data))

    def log_write(self, vdi, offset, length):
        self.seq += 1
        vdi.write_log.append((self.seq, offset // BLOCK, (offset + length - 1) // BLOCK))

    def resize(self, vdi, size):
        os.truncate(vdi.path, size)
        vdi.virtual_size = size

    # -- tasks ---------------------------------------------------------------

    def finish_task(self, task, status, result="", error_info=()):
        """Ends a pending task (a finished one stays as it is, as in XAPI); a task whose
        destroy was asked for meanwhile goes now."""
        if task.done:
            return
        task.status, task.progress, task.finished = status, 1.0, now()
        task.result, task.error_info = result, list(error_info)
        if task.destroy_requested:
            del self.objects[task.ref]

    def cancel_task(self, task):
        """XAPI marks the task and its operation fails with TASK_CANCELLED at its next check;
        here no operation runs between two such checks, so the task ends at once."""
        self.finish_task(task, "cancelled", error_info=["TASK_CANCELLED", task.ref])

    def destroy_task(self, task):
        if task.done:
            del self.objects[task.ref]
        else:
            task.destroy_requested = True

    def expire_tasks(self):
        """Drops every finished task, as the host's garbage collection does after a while."""
        expired = [t for t in self.all("task") if t.done]
        for task in expired:
            del self.objects[task.ref]
        return expired


# ----------------------------------------------------------------------------
# NBD: one nbdkit per exported VDI

class NbdLog:
    """Incremental reader of an nbdkit log filter file: bytes served, open connections."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.tail = b""
        self.pending = {}           # (connection, request id) -> bytes asked for
        self.open = set()           # connections of the current nbdkit process
        self.bytes = 0              # bytes of successful reads, over every process
        self.read_errors = 0        # reads answered with an error, over every process
        self.starts = 0             # nbdkit processes that became ready

    def update(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        *lines, self.tail = (self.tail + chunk).split(b"\n")
        for line in lines:
            self._parse(line.decode(errors="replace").split()[2:])    # drop the date and time

    def _parse(self, words):
        if words[:1] == ["Ready"]:
            self.starts += 1
            self.pending.clear()
            self.open.clear()
            return
        if len(words) < 2 or not words[0].startswith("connection="):
            return
        conn, action = words[0], words[1]
        fields = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        if action == "Connect":
            self.open.add(conn)
        elif action == "Disconnect":
            self.open.discard(conn)
        elif action == "Read":
            self.pending[conn, fields.get("id")] = int(fields.get("count", "0"), 0)
        elif action == "...Read":
            count = self.pending.pop((conn, fields.get("id")), 0)
            if fields.get("return") == "0":
                self.bytes += count
            else:
                self.read_errors += 1


# While a drop is armed, nbdkit's eval plugin serves reads with this script (the
# file plugin otherwise): it counts the bytes asked for and, when a read would pass
# the limit, kills nbdkit before answering, so every connection drops at once.
# nbdkit waits for the script, and the plugin serializes requests: the count is exact.
DROPPING_PREAD = """\
n=$(( $(cat {counter}) + $3 ))
echo $n > {counter}
if [ $n -gt {limit} ]; then kill -9 "$SIM_NBDKIT_PID"; exit 1; fi
exec dd if={path} iflag=skip_bytes,count_bytes skip=$4 count=$3 bs=65536 status=none
"""


class NbdServer:
    """One nbdkit serving one VDI's file read-only. The listening socket belongs to the
    simulator and is handed to nbdkit by socket activation, so a restarted nbdkit keeps
    its port and clients connecting meanwhile wait in the backlog."""

    def __init__(self, manager, vdi):
        self.manager = manager
        self.vdi_uuid = vdi.uuid
        self.origin_uuid = vdi.origin.uuid
        self.path = vdi.path
        self.files = functools.partial(os.path.join, manager.state_dir)
        log_path = self.files(f"nbd-{vdi.uuid}.log")
        if os.path.exists(log_path):
            os.unlink(log_path)
        self.log = NbdLog(log_path)
        self.sock = None
        self.proc = None
        self.drop = None            # (drop rule key, byte limit) the running process is armed with
        self.faults = None          # NbdFaults the running process was started with, or None
        self.baseline = 0           # bytes_read() counts from here
        self.errors_baseline = 0    # read_errors() counts from here

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def start(self, drop=None, wait=True):
        """(Re)starts nbdkit, armed to drop its connections if drop is given; with wait, returns
        when it is ready, and raises XapiError INTERNAL_ERROR if it does not start. Without,
        clients that connect before it is ready wait in the backlog, and one that does not
        start closes its socket (see _watch)."""
        self._kill()
        if self.sock is None:
            self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.log.update()
        starts = self.log.starts
        self._spawn(drop)
        if not wait:
            return
        deadline = time.monotonic() + NBD_START_TIMEOUT
        while self.log.starts == starts:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise XapiError("INTERNAL_ERROR", f"nbdkit for VDI {self.vdi_uuid} did not start")
            time.sleep(0.01)
            self.log.update()

    def stop(self, wait=False):
        # Not waited for: the caller holds the host lock, and xapi-nbd, one server for
        # every VDI, has no process to wait for. Its clients are gone by now.
        self._kill(wait=wait)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.log.update()

    def connections(self):
        self.log.update()
        return len(self.log.open) if self.running else 0

    def bytes_read(self):
        self.log.update()
        return self.log.bytes - self.baseline

    def read_errors(self):
        self.log.update()
        return self.log.read_errors - self.errors_baseline

    def reset_bytes(self):
        self.log.update()
        self.baseline = self.log.bytes
        self.errors_baseline = self.log.read_errors

    def _command(self):
        args = ["nbdkit", "--exit-with-parent", "-r",
                "--no-sr",                  # XenServer's NBD server has no structured replies
                "--filter=log"]             # outermost: it logs the injected errors too
        faults = []
        if self.faults is not None and self.faults.read_error_rate:
            args.append("--filter=error")
            faults += [f"error-pread-rate={self.faults.read_error_rate}",
                       f"error-pread-file={self.faults.trigger}"]
        if self.faults is not None and self.faults.read_delay_ms:
            args.append("--filter=delay")
            faults.append(f"delay-read={self.faults.read_delay_ms}ms")
        if self.faults is not None and self.faults.link_mbit:
            args.append("--filter=rate")
            faults.append(f"rate={self.faults.link_mbit}M")
        args.append("--filter=blocksize-policy")
        if self.manager.mode == "tls":
            args += ["--tls=require", f"--tls-certificates={self.manager.tls_dir}"]
        if self.drop is None:
            args += ["file", self.path]
        else:
            counter = self.files(f"nbd-{self.vdi_uuid}.drop")
            with open(counter, "w") as f:
                f.write("0\n")
            args += ["eval", f"get_size=stat -L -c %s {shlex.quote(self.path)}",
                     "pread=" + DROPPING_PREAD.format(counter=shlex.quote(counter), limit=self.drop[1],
                                                      path=shlex.quote(self.path))]
        return args + faults + [f"logfile={self.log.path}", "logappend=true",
                                "blocksize-minimum=512", "blocksize-error-policy=error"]  # unaligned reads fail, as there

    def _spawn(self, drop):
        self.drop = drop
        self.faults = self.manager.faults_for(self)
        fd = self.sock.fileno()
        onto_fd3 = "" if fd == 3 else f" 3<&{fd} {fd}<&-"
        # bash: dash takes single-digit descriptors only, and with a few dozen
        # VDIs served the socket's is past 9.
        wrapper = ["bash", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 SIM_NBDKIT_PID=$$ exec "$@"' + onto_fd3, "bash",
                   *self._command()]
        # nbdkit's --exit-with-parent follows the spawning thread: spawn from a thread that lives on.
        self.proc = self.manager.spawner.submit(
            subprocess.Popen, wrapper, pass_fds=(fd,), stdin=subprocess.DEVNULL).result()
        threading.Thread(target=self._watch, args=(self.proc,), daemon=True).start()

    def _watch(self, proc):
        """Serves again, unarmed, after an armed nbdkit dropped its connections."""
        proc.wait()
        with self.manager.lock:
            if proc is not self.proc:           # stopped or replaced on purpose
                return
            if self.drop is None:
                log(f"nbdkit for VDI {self.vdi_uuid} exited with status {proc.returncode}")
                self.stop()
                return
            log(f"dropped the NBD connections of VDI {self.vdi_uuid} at {self.drop[1]} bytes")
            self.manager.drops.pop(self.drop[0], None)
            self._spawn(None)

    def _kill(self, wait=True):
        """Stops the running nbdkit; without wait, a thread sees it exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        if wait:
            self._reap(proc)
        else:
            threading.Thread(target=self._reap, args=(proc,), daemon=True).start()

    @staticmethod
    def _reap(proc):
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NbdFrontend:
    """xapi-nbd of one host: the NBD address clients connect to. It counts the connections
    open to the host across all its VDIs and, past its limit, closes a new one as soon as it
    is accepted, before the NBD greeting, as xapi-nbd does ("Server busy: already at maximum
    16 connections" goes to its log only). Admitted connections are relayed byte for byte
    (TLS included) to the VDI's nbdkit. One listening port per VDI stands for the export name,
    which the frontend cannot read inside TLS."""

    def __init__(self, manager, host, limit):
        self.manager = manager
        self.name = host.name_label
        self.address = host.address
        self.limit = limit
        self.lock = threading.Lock()
        self.open = 0               # connections accepted and not yet closed
        self.peak = 0               # most connections open at once (refused ones included)
        self.busy = 0               # connections refused because the host was at its limit
        self.served = 0             # connections admitted
        self.listeners = {}         # VDI uuid -> listening socket
        self.clients = set()        # client sockets of the admitted connections still counted

    def listen(self, uuid):
        """The port that reaches VDI uuid through this host."""
        sock = self.listeners.get(uuid)
        if sock is None:
            sock = self.listeners[uuid] = socket.create_server((self.address, 0), backlog=64)
            threading.Thread(target=self._accept, args=(sock, uuid), daemon=True,
                             name=f"nbd-{self.name}-{uuid[:8]}").start()
        return sock.getsockname()[1]

    def close(self, uuid):
        sock = self.listeners.pop(uuid, None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes the accepting thread
            except OSError:
                pass
            sock.close()

    def counters(self):
        with self.lock:
            return {"name": self.name, "address": self.address, "limit": self.limit, "open": self.open,
                    "peak": self.peak, "busy": self.busy, "served": self.served}

    def reset(self):
        with self.lock:
            self.peak, self.busy, self.served = self.open, 0, 0

    def _accept(self, sock, uuid):
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return              # closed
            self._settle()
            with self.lock:
                self.open += 1
                self.peak = max(self.peak, self.open)
                refused = self.open > self.limit
                self.busy += refused
                self.served += not refused
            if refused:
                log(f"NBD on {self.name}: Server busy: already at maximum {self.limit} connections")
                self._close(client)
                continue
            threading.Thread(target=self._serve, args=(client, uuid), daemon=True).start()

    def _settle(self, limit=0.05):
        """Lets the relays take in what the clients sent (a close included) before a new
        connection is counted: a client that closed one connection and opened the next
        at once must not be counted twice because a relay thread had not run yet."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self.lock:
                clients = list(self.clients)
            try:
                readable = select.select(clients, [], [], 0)[0] if clients else []
            except (OSError, ValueError):   # one closed as we looked
                readable = [None]
            if not readable:
                return
            time.sleep(0.001)

    def _close(self, client):
        try:
            client.close()
        finally:
            with self.lock:
                self.open -= 1

    def _serve(self, client, uuid):
        try:
            port = self.manager.upstream_port(uuid)
            upstream = socket.create_connection(("127.0.0.1", port)) if port else None
        except OSError:
            upstream = None
        if upstream is None:
            self._close(client)
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.clients.add(client)
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        # The client has let go of the connection: it no longer counts, although
        # nbdkit may take a moment to see it go (xapi-nbd counts until it has
        # unplugged its VBD, seconds later on a real host).
        with self.lock:
            self.clients.discard(client)
            self.open -= 1
        back.join()
        upstream.close()
        client.close()

    @staticmethod
    def _pump(src, dst):
        """Copies until src ends, then ends dst's direction (either side's end reaches the other)."""
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
        except OSError:
            pass
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


@dataclass
class NbdFaults:
    """Read faults injected by nbdkit filters (error, delay) for a VDI and its snapshots."""
    trigger: str                    # the error filter injects errors only while this file exists
    read_error_rate: float = 0.0    # share of reads that fail with EIO while errors are on
    read_delay_ms: int = 0          # every read waits this long
    link_mbit: int = 0              # the server's bandwidth, Mbit/s shared by its connections; 0: unlimited
    errors: bool = True             # errors on: the trigger file exists


class NbdManager:
    """The NBD servers of the host, started on demand and kept per VDI uuid."""

    def __init__(self, state_dir, mode, tls_dir, lock, hosts, limit):
        self.state_dir = state_dir
        self.mode = mode
        self.tls_dir = tls_dir
        self.lock = lock
        self.frontends = {h.ref: NbdFrontend(self, h, limit) for h in hosts}
        self.servers = {}           # VDI uuid -> NbdServer (kept after stop for byte counts)
        self.drops = {}             # VDI uuid -> bytes after which its (or its snapshots') server drops
        self.faults = {}            # VDI uuid -> NbdFaults of its (and its snapshots') servers
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="nbdkit-spawner")

    def serve(self, vdi, host):
        """Starts the VDI's server unless it runs; returns the port that reaches it through host."""
        server = self.servers.get(vdi.uuid)
        if server is None:
            server = self.servers[vdi.uuid] = NbdServer(self, vdi)
        if not server.running:
            # Not waited for: it would hold the host lock (every other call) for the
            # nbdkit's start, which xapi-nbd, one server for every VDI, never costs.
            server.start(self._drop_rule(server), wait=False)
        return self.frontends[host.ref].listen(vdi.uuid)

    def upstream_port(self, uuid):
        """The port of VDI uuid's nbdkit, None when it is not serving. Without the host lock,
        which a snapshot holds for a while: a server stopped meanwhile just gives None."""
        server = self.servers.get(uuid)
        try:
            return server.port if server is not None and server.running else None
        except AttributeError:      # its socket went as we looked
            return None

    def host_counters(self):
        return [f.counters() for f in self.frontends.values()]

    def _drop_rule(self, server):
        key = next((k for k in (server.vdi_uuid, server.origin_uuid) if k in self.drops), None)
        return (key, self.drops[key]) if key else None

    def arm_drop(self, uuid, after_bytes):
        """Arms the servers of a VDI and of its snapshots; running ones restart armed."""
        self.drops[uuid] = after_bytes
        for server in self._family(uuid):
            if server.running:
                server.start(self._drop_rule(server))

    def faults_for(self, server):
        """The read faults a server is to be started with (its own VDI's, else its origin's), or None."""
        key = next((k for k in (server.vdi_uuid, server.origin_uuid) if k in self.faults), None)
        faults = self.faults.get(key)
        return (faults if faults is not None and (faults.read_error_rate or faults.read_delay_ms or faults.link_mbit)
                else None)

    def set_faults(self, uuid, read_error_rate=None, read_delay_ms=None, errors=None, link_mbit=None):
        """Changes the read faults of a VDI and its snapshots. A new error rate or delay applies to
        the servers started later, and running ones restart with it at once; errors switches the
        injected errors on or off at once (the error filter's trigger file)."""
        faults = self.faults.get(uuid)
        if faults is None:
            faults = self.faults[uuid] = NbdFaults(trigger=os.path.join(self.state_dir, f"nbd-{uuid}.errors-on"))
        changed = ((read_error_rate is not None and read_error_rate != faults.read_error_rate)
                   or (read_delay_ms is not None and read_delay_ms != faults.read_delay_ms)
                   or (link_mbit is not None and link_mbit != faults.link_mbit))
        if read_error_rate is not None:
            faults.read_error_rate = read_error_rate
        if read_delay_ms is not None:
            faults.read_delay_ms = read_delay_ms
        if link_mbit is not None:
            faults.link_mbit = link_mbit
        if errors is not None:
            faults.errors = errors
        if faults.errors:
            with open(faults.trigger, "w"):
                pass
        elif os.path.exists(faults.trigger):
            os.unlink(faults.trigger)
        if changed:
            for server in self._family(uuid):
                if server.running:
                    server.start(self._drop_rule(server))
        return faults

    def _family(self, uuid):
        return [s for s in self.servers.values() if uuid in (s.vdi_uuid, s.origin_uuid)]

    def stop(self, uuid):
        for frontend in self.frontends.values():
            frontend.close(uuid)
        if uuid in self.servers:
            self.servers[uuid].stop()

    def connections(self, uuid):
        return self.servers[uuid].connections() if uuid in self.servers else 0

    def running(self, uuid):
        return uuid in self.servers and self.servers[uuid].running

    def bytes_read(self, uuid):
        """Bytes read over NBD from the VDI's server and those of its snapshots."""
        return sum(s.bytes_read() for s in self._family(uuid))

    def read_errors(self, uuid):
        """Reads answered with an error by the VDI's server and those of its snapshots."""
        return sum(s.read_errors() for s in self._family(uuid))

    def reset_counters(self):
        for server in self.servers.values():
            server.reset_bytes()
        for frontend in self.frontends.values():
            frontend.reset()

    def close(self):
        for uuid in list(self.servers):
            for frontend in self.frontends.values():
                frontend.close(uuid)
            self.servers[uuid].stop(wait=True)
        self.spawner.shutdown()


# ----------------------------------------------------------------------------
# The host: state shared by the XML-RPC and control interfaces

@dataclass
class FailRule:
    count: int
    error: "list | None" = None
    http_status: "int | None" = None
    delay: float = 0.0
    malformed: bool = False         # the call is made; its answer is cut off halfway
    no_answer: bool = False         # the call is made; the connection closes without an answer
    expire_session: bool = False    # the call's session is logged out first


@dataclass
class TaskDelay:
    count: int
    seconds: float                  # the task stays pending this long before its work is done


@dataclass
class ImportFault:
    count: int
    after_bytes: int                # the import writes this much, then fails as on an I/O error


@dataclass
class ImportRedirect:
    count: int
    to: str                         # scheme://host:port the 302 sends the import to, path and query kept


class Host:
    def __init__(self, state_dir, config, certs):
        self.config = config
        self.certs = certs
        self.nbd_named = "nbd_host_name" in config     # a certificate naming that host name only
        self.nbd_subject = config.get("nbd_host_name", "localhost")
        self.nbd_cert_pem = (use_nbd_host_name(certs, state_dir, self.nbd_subject, config.get("nbd_pin"))
                             if "nbd_host_name" in config else certs.cert_pem)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        vdi_dir = os.path.join(state_dir, "vdis")
        os.makedirs(vdi_dir, exist_ok=True)
        self.model = Model(vdi_dir)
        self.model.load(config)
        self.nbd = NbdManager(state_dir, config["nbd"], certs.nbd_dir, self.lock, self.model.hosts(),
                              config["nbd_limit"])
        self.sessions = {}          # session ref -> user name
        self.fail_rules = {}        # method -> FailRule
        self.task_delays = {}       # Async.* method -> TaskDelay
        self.import_faults = {}     # "import_raw_vdi" -> ImportFault
        self.import_redirects = {}  # "import_raw_vdi" -> ImportRedirect
        self.imports = []           # one record per PUT /import_raw_vdi, for /imports
        self.other_host = None      # URL of the second listener, the pool member that sees the SR
        self.calls = Counter()      # method -> calls received

    def take_rule(self, rules, key):
        """The rule armed for key, one of its uses spent; None if none is armed."""
        with self.lock:
            rule = rules.get(key)
            if rule is not None:
                rule.count -= 1
                if rule.count <= 0:
                    del rules[key]
            return rule

    def take_fail_rule(self, method):
        return self.take_rule(self.fail_rules, method)

    def release_nbd(self, vdi, operation):
        """Waits (lock released) for the VDI's NBD clients to leave, then stops its server;
        VDI_IN_USE if they stay, as XAPI does while a VBD stays plugged."""
        deadline = time.monotonic() + IN_USE_WAIT
        while self.nbd.connections(vdi.uuid):
            if time.monotonic() > deadline:
                raise XapiError("VDI_IN_USE", vdi.ref, operation)
            self.cond.wait(0.1)
        self.nbd.stop(vdi.uuid)

    def close(self):
        with self.lock:
            self.nbd.close()


# ----------------------------------------------------------------------------
# XML-RPC methods

@dataclass
class Reply:
    status: int             # 0: close the connection without an answer
    body: bytes
    content_type: str = "text/xml"


API = {}    # method name -> (function, least params, most params), params counting the session


def api(name):
    def register(fn):
        params = list(inspect.signature(fn).parameters.values())[1:]
        least = sum(p.default is inspect.Parameter.empty for p in params)
        API[name] = (fn, least, len(params))
        return fn
    return register


RECORD_CLASSES = ("VM", "VBD", "VDI", "SR", "task", "host")
GENERIC_ARITY = {"get_all": 1, "get_all_records": 1}     # other generic calls take (session, arg)
ASYNC = "Async."
# The calls served in an Async.* form too: it returns a task at once and does the call in a
# thread. XAPI has Async forms of most calls; these are the ones a backup client waits on.
ASYNC_METHODS = frozenset({"VM.snapshot", "VDI.snapshot", "VDI.list_changed_blocks"})


class XapiService:
    """Dispatches XML-RPC calls the way XAPI does: method, parameter count, session, handles."""

    def __init__(self, host):
        self.host = host
        self.model = host.model

    def call(self, method, params, client_gone=lambda: False):
        self.host.calls[method] += 1
        rule = self.host.take_fail_rule(method)
        if rule is not None:
            # A delay stands for a slow network before the host: a client
            # that died meanwhile never got its call to the host.
            time.sleep(rule.delay)
            if rule.delay and client_gone():
                log(f"{method}: the client went away during the injected delay; call not made")
                return Reply(200, b"", "text/plain")
            if rule.http_status:
                log(f"{method}: injected HTTP {rule.http_status}")
                return Reply(rule.http_status, b"injected failure\n", "text/plain")
            if rule.error:
                log(f"{method}: injected {rule.error[0]}")
                return Reply(200, method_response({"Status": "Failure", "ErrorDescription": rule.error}))
            if rule.expire_session and params and isinstance(params[0], str):
                with self.host.lock:
                    if self.host.sessions.pop(params[0], None) is not None:
                        log(f"{method}: expired the session of the call")
        start = time.monotonic()
        try:
            with self.host.lock:
                value = self._dispatch(method, params)
            result = {"Status": "Success", "Value": value}
            log(f"{method}: Success ({(time.monotonic() - start) * 1000:.0f} ms)")
        except XapiError as e:
            result = {"Status": "Failure", "ErrorDescription": e.description}
            log(f"{method}: {' '.join(e.description)} ({(time.monotonic() - start) * 1000:.0f} ms)")
        body = method_response(result)
        if rule is not None and rule.no_answer:
            log(f"{method}: closing the connection without an answer")
            return Reply(0, b"")
        if rule is not None and rule.malformed:
            # A garbled answer: well-formed XML up to the middle, then nothing.
            log(f"{method}: injected a malformed answer")
            body = body[:len(body) // 2]
        return Reply(200, body)

    def _dispatch(self, method, params):
        name = method.removeprefix(ASYNC)
        is_async = name != method
        entry = API.get(name) if not is_async or name in ASYNC_METHODS else None
        cls, _, op = name.partition(".")
        if entry is not None:
            fn, least, most = entry
        elif not is_async and cls in RECORD_CLASSES and (op in GENERIC_ARITY or op.startswith("get_")):
            fn, least, most = None, GENERIC_ARITY.get(op, 2), GENERIC_ARITY.get(op, 2)
        else:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        if not least <= len(params) <= most:
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, most, len(params))
        if method != LOGIN:
            self._check_session(params[0])
        if is_async:
            # As in XAPI, the refs are checked by the call itself: a bad one fails the task.
            return self._start_task(method, fn, params).ref
        if fn is None:
            return self._generic(cls, op, *params[1:])
        return fn(self, *params)

    def _check_session(self, ref):
        if not isinstance(ref, str) or ref not in self.host.sessions:
            raise XapiError("SESSION_INVALID", ref)

    def _generic(self, cls, op, *args):
        """get_all, get_all_records, get_all_records_where, get_by_uuid, get_by_name_label, get_record,
        get_<field>."""
        m = self.model
        if op == "get_all":
            return [o.ref for o in m.all(cls)]
        if op == "get_all_records":
            return {o.ref: m.record(o) for o in m.all(cls)}
        if op == "get_all_records_where":
            if not isinstance(args[0], str):
                raise XapiError("FIELD_TYPE_ERROR", "expr")
            tree = parse_filter(args[0])
            rows = [Row(m, o) for o in m.all(cls)]
            return {row.obj.ref: row.record() for row in rows if eval_filter(tree, row, row.obj.ref)}
        if op == "get_by_uuid":
            return m.by_uuid(cls, args[0]).ref
        if op == "get_by_name_label":
            return [o.ref for o in m.all(cls) if getattr(o, "name_label", None) == args[0]]
        record = m.record(m.get(cls, args[0]))
        if op == "get_record":
            return record
        if op[len("get_"):] not in record:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", f"{cls}.{op}")
        return record[op[len("get_"):]]

    # -- sessions ------------------------------------------------------------

    @api(LOGIN)
    def session_login(self, user, password, version="", originator=""):
        if user != self.host.config["user"] or password != self.host.config["password"]:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        ref = new_ref()
        self.host.sessions[ref] = user
        return ref

    @api("session.logout")
    def session_logout(self, session):
        del self.host.sessions[session]

    # -- tasks ---------------------------------------------------------------

    def _start_task(self, method, fn, params):
        """A pending task for an Async.* call, whose work a thread does (host lock held)."""
        task = self.model.add(Task(name_label=method))
        delay = self.host.take_rule(self.host.task_delays, method)
        threading.Thread(target=self._run_task, args=(task, fn, params, delay.seconds if delay else 0),
                         name=f"task-{task.uuid}", daemon=True).start()
        log(f"{method}: task {task.ref} started" + (f", pending for {delay.seconds} s" if delay else ""))
        return task

    def _run_task(self, task, fn, params, delay):
        with self.host.lock:
            # The lock is let go while waiting; task.cancel wakes the wait.
            self.host.cond.wait_for(lambda: task.done, delay)
            if task.done:
                log(f"{task.name_label}: task {task.ref} {task.status} before its work began")
                return
            try:
                result = encode_value(fn(self, *params))
                self.model.finish_task(task, "success", result=result)
            except XapiError as e:
                self.model.finish_task(task, "failure", error_info=e.description)
            except Exception as e:      # a bug: the task says so rather than stay pending
                log(traceback.format_exc())
                self.model.finish_task(task, "failure", error_info=["INTERNAL_ERROR", f"{type(e).__name__}: {e}"])
            log(f"{task.name_label}: task {task.ref} {task.status} {' '.join(task.error_info)}".rstrip())

    @api("task.create")
    def task_create(self, session, label, description):
        return self.model.add(Task(name_label=label, name_description=description)).ref

    @api("task.cancel")
    def task_cancel(self, session, task):
        self.model.cancel_task(self.model.get("task", task))
        self.host.cond.notify_all()

    @api("task.destroy")
    def task_destroy(self, session, self_):
        self.model.destroy_task(self.model.get("task", self_))

    # -- VMs -----------------------------------------------------------------

    @api("VM.snapshot")
    def vm_snapshot(self, session, vm, new_name, ignore_vdis=()):
        return self.model.snapshot_vm(self.model.get("VM", vm), new_name, ignore_vdis).ref

    @api("VM.destroy")
    def vm_destroy(self, session, vm):
        self.model.destroy_vm(self.model.get("VM", vm))

    # -- VDIs ----------------------------------------------------------------

    @api("VDI.snapshot")
    def vdi_snapshot(self, session, vdi, driver_params=None):
        return self.model.snapshot_vdi(self.model.get("VDI", vdi), now()).ref

    @api("VDI.create")
    def vdi_create(self, session, record):
        if not isinstance(record, dict):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        try:
            size = int(record.get("virtual_size", 0))
        except ValueError:
            raise XapiError("FIELD_TYPE_ERROR", "virtual_size")
        size = (size + SECTOR - 1) // SECTOR * SECTOR
        vdi = self.model.create_vdi(self.model.get("SR", record.get("SR", NULL_REF)),
                                    record.get("name_label", ""), size, type=record.get("type", "user"),
                                    read_only=bool(record.get("read_only", False)),
                                    sharable=bool(record.get("sharable", False)),
                                    other_config=dict(record.get("other_config") or {}))
        return vdi.ref

    @api("VDI.set_name_label")
    def vdi_set_name_label(self, session, vdi, value):
        self.model.get("VDI", vdi).name_label = value

    @api("VDI.enable_cbt")
    def vdi_enable_cbt(self, session, vdi):
        self.model.enable_cbt(self.model.get("VDI", vdi))

    @api("VDI.disable_cbt")
    def vdi_disable_cbt(self, session, vdi):
        self.model.disable_cbt(self.model.get("VDI", vdi))

    @api("VDI.list_changed_blocks")
    def vdi_list_changed_blocks(self, session, vdi_from, vdi_to):
        vdi_from, vdi_to = self.model.get("VDI", vdi_from), self.model.get("VDI", vdi_to)
        self.model.check_changed_blocks(vdi_from, vdi_to)
        if self.host.nbd.connections(vdi_to.uuid):
            raise XapiError("VDI_IN_USE", vdi_to.ref)
        return self.model.changed_blocks(vdi_from, vdi_to)

    @api("VDI.get_nbd_info")
    def vdi_get_nbd_info(self, session, vdi):
        vdi = self.model.get("VDI", vdi)
        if vdi.type == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi.ref, "cbt_metadata")
        if self.host.nbd.mode == "none":
            return []
        # One record per host that sees the VDI's SR, as XAPI lists every host with its PBD
        # plugged. The master's certificate names "localhost" (or nbd_host_name); the other
        # hosts' subject is their address, which the same certificate also names.
        # Without TLS (an insecure_nbd network) there is no certificate to hand out.
        tls = self.host.nbd.mode == "tls"
        return [{"exportname": f"/{vdi.uuid}?session_id={session}", "address": host.address,
                 "port": self.host.nbd.serve(vdi, host), "cert": self.host.nbd_cert_pem if tls else "",
                 "subject": "" if not tls else
                 self.host.nbd_subject if host.is_master or self.host.nbd_named else host.address}
                for host in self.model.hosts_of(vdi.sr)]

    @api("VDI.data_destroy")
    def vdi_data_destroy(self, session, vdi):
        vdi = self.model.get("VDI", vdi)
        if vdi.type == "cbt_metadata":
            return None
        self.model.check_data_destroy(vdi)
        self.host.release_nbd(vdi, "data_destroy")
        self.model.data_destroy(vdi)

    @api("VDI.destroy")
    def vdi_destroy(self, session, vdi):
        vdi = self.model.get("VDI", vdi)
        self.model.check_destroy(vdi)
        self.host.release_nbd(vdi, "destroy")
        self.model.destroy_vdi(vdi)

    # -- HTTP handlers -------------------------------------------------------

    def import_target(self, query, transfer_encoding=None):
        """The VDI a PUT /import_raw_vdi writes into, and the task (from task_id, else None) that
        reports how it went. HttpError if the request is wrong; that fails the task too."""
        with self.host.lock:
            if query.get("session_id") not in self.host.sessions:
                raise HttpError(401, "invalid session")
            task = None
            if "task_id" in query:
                try:
                    task = self.model.get("task", query["task_id"])
                except XapiError:
                    raise HttpError(404, f"no task {query['task_id']}")
            try:
                vdi = self._import_vdi(query)
                if transfer_encoding:
                    # XAPI reads the body straight off the socket: no HTTP
                    # transfer encoding, whatever the format.
                    raise HttpError(404, f"cannot handle encoding: {transfer_encoding}",
                                    ["INTERNAL_ERROR", f"Cannot handle encoding: {transfer_encoding}"])
                return vdi, task
            except HttpError as e:
                if task is not None:
                    self.model.finish_task(task, "failure", error_info=e.error_info)
                    log(f"import_raw_vdi: task {task.ref} failure {' '.join(e.error_info)}")
                raise

    def _import_vdi(self, query):
        fmt = query.get("format", "raw")
        if fmt != "raw":
            raise HttpError(400, "only format=raw is supported", ["INTERNAL_ERROR", f"Unknown format {fmt}"])
        key = query.get("vdi", "")
        try:
            vdi = self.model.get("VDI", key) if key.startswith("OpaqueRef:") else self.model.by_uuid("VDI", key)
        except XapiError as e:
            raise HttpError(404, f"no VDI {key}", e.description)
        if not vdi.path:
            raise HttpError(400, f"VDI {key} has no data", ["VDI_INCOMPATIBLE_TYPE", vdi.ref, vdi.type])
        return vdi

    def import_redirect(self, query, raw_query, on_member):
        """Where a 302 sends this import (an armed /import_redirect, on the host the client
        called, with a valid session); None when it is to be served here."""
        if on_member:
            return None
        with self.host.lock:
            if query.get("session_id") not in self.host.sessions:
                return None             # the 401 comes first
        rule = self.host.take_rule(self.host.import_redirects, "import_raw_vdi")
        return None if rule is None else f"{rule.to}/import_raw_vdi?{raw_query}"

    def new_import(self, query, host_name, http_host):
        """The record /imports shows for one PUT /import_raw_vdi; the handler fills it in.
        All its keys exist from the start: /imports may read it while the upload runs."""
        rec = {"vdi": query.get("vdi"), "task": query.get("task_id"), "host": host_name, "http_host": http_host,
               "chunked": "chunked" in query, "outcome": "running", "redirected_to": None,
               "body_bytes": 0, "data_bytes": 0, "chunks": 0}
        with self.host.lock:
            self.host.imports.append(rec)
        return rec

    def take_import_fault(self):
        return self.host.take_rule(self.host.import_faults, "import_raw_vdi")

    def import_progress(self, task, written, total):
        with self.host.lock:
            if not task.done:
                task.progress = min(written / total, 0.99) if total else 0.0

    def imported(self, vdi, extents, task=None, failure=None):
        """Logs the writes an import made (a failed one too: they are in the VDI) and ends its
        task: success with the VDI's ref as result, as XAPI's raw import does, or failure with
        what XAPI reports whenever its vhd-tool fails."""
        with self.host.lock:
            for offset, length in extents:
                if length:
                    self.model.log_write(vdi, offset, length)
            if task is not None and failure is None:
                self.model.finish_task(task, "success", result=encode_value(vdi.ref))
            elif task is not None:
                self.model.finish_task(task, "failure", error_info=IO_ERROR)
        length = sum(n for _, n in extents)
        outcome = "" if failure is None else f", then failed: {failure}"
        on_task = f" (task {task.ref}: {task.status})" if task is not None else ""
        log(f"import_raw_vdi: {length} bytes into VDI {vdi.uuid}{outcome}{on_task}")


# ----------------------------------------------------------------------------
# Control API (JSON)

def live_vdi_of(host, body):
    uuid = body.get("vdi")
    vdi = next((v for v in host.model.all("VDI") if v.uuid == uuid), None)
    if vdi is None:
        raise HttpError(404, f"no VDI {uuid}")
    if vdi.is_a_snapshot:
        raise HttpError(400, f"VDI {uuid} is a snapshot, not a live disk")
    return vdi


def int_field(body, name, default=None):
    value = body.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be an integer")


def number_field(body, name):
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise HttpError(400, f"{name} must be a number, 0 or more")
    return value


class ControlApi:
    """What tests do behind XAPI's back: guest writes, resizes, faults, and inspection."""

    def __init__(self, host):
        self.host = host
        self.model = host.model

    def get(self, path, query):
        with self.host.lock:
            if path == "/state":
                return self.state()
            if path == "/calls":
                return dict(self.host.calls)
            if path == "/nbd_bytes":
                uuid = query.get("vdi", "")
                return {"vdi": uuid, "bytes": self.host.nbd.bytes_read(uuid),
                        "read_errors": self.host.nbd.read_errors(uuid)}
            if path == "/imports":
                return {"imports": [dict(rec) for rec in self.host.imports]}
            if path == "/nbd_hosts":
                return {"hosts": self.host.nbd.host_counters()}
        raise HttpError(404, f"no GET {path}")

    def post(self, path, body):
        handler = {"/write": self.write, "/resize": self.resize, "/disable_cbt": self.disable_cbt,
                   "/fail": self.fail, "/nbd_drop": self.nbd_drop, "/nbd_faults": self.nbd_faults,
                   "/reset_counters": self.reset_counters, "/task_delay": self.task_delay,
                   "/import_fail": self.import_fail, "/import_redirect": self.import_redirect,
                   "/expire_tasks": self.expire_tasks, "/power_state": self.power_state,
                   "/nbd_limit": self.nbd_limit, "/dom0_attach": self.dom0_attach}.get(path)
        if handler is None:
            raise HttpError(404, f"no POST {path}")
        with self.host.lock:
            return handler(body)

    def state(self):
        m, nbd = self.model, self.host.nbd
        uuid_of = lambda obj: obj.uuid if obj is not None else None    # noqa: E731
        vms = [{"uuid": vm.uuid, "ref": vm.ref, "name": vm.name_label, "is_a_snapshot": vm.is_a_snapshot,
                "snapshot_of": uuid_of(vm.snapshot_of), "is_control_domain": vm.is_control_domain,
                "is_a_template": vm.is_template, "host": vm.host.name_label if vm.host else None,
                "tags": list(vm.tags), "power_state": vm.power_state,
                "vdis": [b.vdi.uuid for b in m.vbds(vm=vm) if b.type == "Disk" and b.vdi is not None]}
               for vm in m.all("VM")]
        vdis = [{"uuid": v.uuid, "ref": v.ref, "name": v.name_label, "type": v.type,
                 "is_a_snapshot": v.is_a_snapshot, "snapshot_of": uuid_of(v.snapshot_of),
                 "cbt_enabled": v.cbt_enabled, "virtual_size": v.virtual_size, "path": v.path,
                 "sr_type": v.sr.type, "sr_shared": v.sr.host is None, "nbd_running": nbd.running(v.uuid)}
                for v in m.all("VDI")]
        tasks = [{"uuid": t.uuid, "ref": t.ref, "name": t.name_label, "status": t.status, "result": t.result,
                  "error_info": t.error_info} for t in m.all("task")]
        hosts = [{"name": h.name_label, "uuid": h.uuid, "ref": h.ref, "address": h.address,
                  "is_master": h.is_master} for h in m.hosts()]
        return {"vms": vms, "vdis": vdis, "tasks": tasks, "sessions": len(self.host.sessions), "hosts": hosts}

    def write(self, body):
        vdi = live_vdi_of(self.host, body)
        offset = int_field(body, "offset")
        if "data_b64" in body:
            try:
                data = base64.b64decode(body["data_b64"], validate=True)
            except ValueError as e:
                raise HttpError(400, f"bad data_b64: {e}")
        else:
            length = int_field(body, "length")
            pattern = body.get("pattern", "random")
            if pattern == "random":
                data = random.Random(body.get("seed", 0)).randbytes(length)
            elif pattern == "zero":
                data = bytes(length)
            else:
                raise HttpError(400, f"unknown pattern {pattern!r}")
        self.model.guest_write(vdi, offset, data)
        return {"vdi": vdi.uuid, "offset": offset, "length": len(data)}

    def resize(self, body):
        vdi = live_vdi_of(self.host, body)
        size = int_field(body, "size")
        if size <= 0 or size % SECTOR:
            raise HttpError(400, f"size must be a positive multiple of {SECTOR}")
        self.model.resize(vdi, size)
        return {"vdi": vdi.uuid, "virtual_size": size}

    def power_state(self, body):
        uuid = body.get("vm")
        vm = next((v for v in self.model.all("VM") if v.uuid == uuid), None)
        if vm is None:
            raise HttpError(404, f"no VM {uuid}")
        if vm.is_a_snapshot or vm.is_control_domain:
            raise HttpError(400, f"VM {uuid} is a snapshot or the control domain: its power state is fixed")
        state = body.get("state")
        if state not in ("Running", "Halted", "Paused", "Suspended"):
            raise HttpError(400, "state must be Running, Halted, Paused or Suspended")
        vm.state = state
        return {"vm": vm.uuid, "power_state": vm.power_state}

    def disable_cbt(self, body):
        vdi = live_vdi_of(self.host, body)
        vdi.cbt_chain = None
        return {"vdi": vdi.uuid, "cbt_enabled": False}

    def fail(self, body):
        method = body.get("method")
        error = body.get("error")
        if not isinstance(method, str) or not method:
            raise HttpError(400, "method is required")
        if error is not None and (not isinstance(error, list) or not error):
            raise HttpError(400, "error must be a non-empty array of strings")
        rule = FailRule(count=int_field(body, "count", 1), error=[str(e) for e in error or []] or None,
                        http_status=body.get("http_status") and int_field(body, "http_status"),
                        delay=float(body.get("delay", 0)), malformed=bool(body.get("malformed", False)),
                        no_answer=bool(body.get("no_answer", False)),
                        expire_session=bool(body.get("expire_session", False)))
        if not (rule.error or rule.http_status or rule.delay or rule.malformed or rule.no_answer
                or rule.expire_session):
            raise HttpError(400, "give error, http_status, delay, malformed, no_answer or expire_session")
        self.host.fail_rules[method] = rule
        return {"method": method, "count": rule.count}

    def nbd_drop(self, body):
        uuid = body.get("vdi")
        if not any(v.uuid == uuid for v in self.model.all("VDI")):
            raise HttpError(404, f"no VDI {uuid}")
        after = int_field(body, "after_bytes")
        self.host.nbd.arm_drop(uuid, after)
        return {"vdi": uuid, "after_bytes": after}

    def nbd_faults(self, body):
        uuid = body.get("vdi")
        if not any(v.uuid == uuid for v in self.model.all("VDI")):
            raise HttpError(404, f"no VDI {uuid}")
        rate = body.get("read_error_rate")
        if rate is not None:
            try:
                rate = float(rate)
            except (TypeError, ValueError):
                rate = -1.0
            if not 0 <= rate <= 1:
                raise HttpError(400, "read_error_rate must be a number from 0 to 1")
        delay = body.get("read_delay_ms")
        if delay is not None:
            delay = int_field(body, "read_delay_ms")
            if delay < 0:
                raise HttpError(400, "read_delay_ms must not be negative")
        link = body.get("link_mbit")
        if link is not None:
            link = int_field(body, "link_mbit")
            if link < 0:
                raise HttpError(400, "link_mbit must not be negative")
        errors = body.get("errors")
        if errors is not None and not isinstance(errors, bool):
            raise HttpError(400, "errors must be true or false")
        faults = self.host.nbd.set_faults(uuid, rate, delay, errors, link)
        return {"vdi": uuid, "read_error_rate": faults.read_error_rate, "read_delay_ms": faults.read_delay_ms,
                "link_mbit": faults.link_mbit, "errors": faults.errors}

    def reset_counters(self, body):
        self.host.calls.clear()
        self.host.nbd.reset_counters()
        self.host.imports.clear()
        return {}

    def task_delay(self, body):
        method = body.get("method")
        if not isinstance(method, str) or not method.startswith(ASYNC) or method[len(ASYNC):] not in ASYNC_METHODS:
            raise HttpError(400, f"method must be one of {', '.join(sorted(ASYNC + m for m in ASYNC_METHODS))}")
        seconds = number_field(body, "seconds")
        delay = TaskDelay(count=int_field(body, "count", 1), seconds=seconds)
        self.host.task_delays[method] = delay
        return {"method": method, "seconds": seconds, "count": delay.count}

    def import_fail(self, body):
        after = int_field(body, "after_bytes")
        if after < 0:
            raise HttpError(400, "after_bytes must not be negative")
        fault = ImportFault(count=int_field(body, "count", 1), after_bytes=after)
        self.host.import_faults["import_raw_vdi"] = fault
        return {"after_bytes": after, "count": fault.count}

    def import_redirect(self, body):
        to = body.get("to", self.host.other_host)
        if not isinstance(to, str) or urlsplit(to).scheme not in ("http", "https") or not urlsplit(to).netloc:
            raise HttpError(400, "to must be a URL such as https://127.0.0.1:PORT")
        rule = ImportRedirect(count=int_field(body, "count", 1), to=to.rstrip("/"))
        self.host.import_redirects["import_raw_vdi"] = rule
        return {"to": rule.to, "count": rule.count}

    def expire_tasks(self, body):
        return {"expired": [t.ref for t in self.model.expire_tasks()]}

    def dom0_attach(self, body):
        """Plugs a VDI into a control domain, as xapi-nbd does for each NBD connection and
        leaves behind when it dies before unplugging (xen-orchestra issue 7912)."""
        uuid = body.get("vdi")
        vdi = next((v for v in self.model.all("VDI") if v.uuid == uuid), None)
        if vdi is None:
            raise HttpError(404, f"no VDI {uuid}")
        name = body.get("host", self.model.master().name_label)
        dom0 = next((vm for vm in self.model.all("VM") if vm.is_control_domain and vm.host.name_label == name), None)
        if dom0 is None:
            raise HttpError(404, f"no host {name}")
        vbd = self.model.add(Vbd(vm=dom0, vdi=vdi, type="Disk", userdevice=str(len(self.model.vbds(vm=dom0)))))
        return {"vbd": vbd.uuid, "vm": dom0.name_label}

    def nbd_limit(self, body):
        limit = int_field(body, "limit")
        if limit < 0:
            raise HttpError(400, "limit must not be negative")
        name = body.get("host")
        frontends = [f for f in self.host.nbd.frontends.values() if name is None or f.name == name]
        if not frontends:
            raise HttpError(404, f"no host {name}")
        for f in frontends:
            with f.lock:
                f.limit = limit
        return {"hosts": [f.name for f in frontends], "limit": limit}


# ----------------------------------------------------------------------------
# HTTP servers

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300
    # Headers and body go out in separate writes: with Nagle's algorithm the
    # body waits for the client's delayed ACK, 40 ms per call that a real
    # host does not cost.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):    # calls are logged by the services
        pass

    def body_chunks(self):
        """The request body, piece by piece (Content-Length or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                raise HttpError(400, "body shorter than Content-Length")
            remaining -= len(chunk)
            yield chunk

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_text(self, status, text):
        self.reply(status, text.encode(), "text/plain")


class XapiHandler(Handler):
    def do_POST(self):
        if urlsplit(self.path).path not in ("/", "/RPC2"):
            self.close_connection = True
            return self.reply_text(404, "not found\n")
        try:
            method, params = parse_method_call(b"".join(self.body_chunks()))
        except HttpError as e:
            log(f"bad request: {e.message}")
            self.close_connection = True
            return self.reply_text(e.status, e.message + "\n")
        r = self.server.service.call(method, params, self.client_gone)
        if r.status == 0:           # an injected lost answer
            self.close_connection = True
            return
        try:
            self.reply(r.status, r.body, r.content_type)
        except OSError as e:        # the client gave up on the call (a timeout) and closed
            log(f"{method}: the answer did not reach the client: {e}")
            self.close_connection = True

    def client_gone(self):
        # Peeks below TLS: a killed client's kernel sent FIN, nothing else.
        try:
            with socket.fromfd(self.connection.fileno(), socket.AF_INET, socket.SOCK_STREAM) as raw:
                ready, _, _ = select.select([raw], [], [], 0)
                return bool(ready) and raw.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def handle_expect_100(self):
        # An import the host sends elsewhere gets its 302 at once, no 100:
        # the client then never sends the body here (XAPI does not read it).
        if self.command == "PUT" and self.redirect_to() is not None:
            return True
        return super().handle_expect_100()

    def redirect_to(self):
        """The 302's Location for this request, decided once; None if it is served here."""
        if not hasattr(self, "_redirect"):
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            self._redirect = (self.server.service.import_redirect(query, url.query, self.server.is_member)
                              if url.path == "/import_raw_vdi" else None)
        return self._redirect

    def do_PUT(self):
        url = urlsplit(self.path)
        if url.path != "/import_raw_vdi":
            self.close_connection = True
            return self.reply_text(404, "not found\n")
        service = self.server.service
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        body = Body(self.body_chunks())
        rec = service.new_import(query, self.server.host_name, self.headers.get("Host"))
        try:
            self.put_import(query, body, rec)
        finally:
            rec["body_bytes"] = body.received

    def put_import(self, query, body, rec):
        service = self.server.service
        location = self.redirect_to()
        if location is not None:
            return self.redirect(location, rec)
        try:
            vdi, task = service.import_target(query, self.headers.get("Transfer-Encoding"))
        except HttpError as e:
            rec["outcome"] = f"refused {e.status}"
            return self.refuse(body, e)
        chunked = "chunked" in query
        if task is not None:
            return self.import_with_task(vdi, task, body, chunked, rec)
        fault = service.take_import_fault()
        try:
            extents = self.receive_into(vdi, body, rec, chunked, fault)
        except UploadFailed as e:
            service.imported(vdi, e.extents, failure=e.message)
            rec["outcome"] = "failure"
            if fault is not None and e.status == 500:
                # XAPI has answered 200 before the storage failed; only a
                # task would have told. A client without one learns nothing.
                self.drain(body)
                return self.reply_text(200, "")
            return self.refuse(body, e)
        service.imported(vdi, extents)
        rec["outcome"] = "success"
        self.reply_text(200, "")

    def redirect(self, location, rec):
        """As XAPI when this host cannot see the VDI's SR: 302 to a host that can, the path and
        query kept, before the body is read; the connection then closes with the body unread."""
        rec["outcome"], rec["redirected_to"] = "redirected", location
        log(f"import_raw_vdi: 302 to {location}")
        self.close_connection = True
        try:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Connection", "close")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.wfile.flush()
        except OSError as e:
            log(f"import_raw_vdi: the 302 did not reach the client: {e}")

    def import_with_task(self, vdi, task, body, chunked, rec):
        """As XAPI: HTTP 200 before the body is read, the outcome in the task only. The answer
        has no length and ends when the connection closes, once the body is taken in."""
        service = self.server.service
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.send_header("task-id", task.ref)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.flush()
        except OSError as e:
            log(f"import_raw_vdi: the answer did not reach the client: {e}")
        fault = service.take_import_fault()
        try:
            extents = self.receive_into(vdi, body, rec, chunked, fault, task)
        except UploadFailed as e:
            service.imported(vdi, e.extents, task, failure=e.message)
            rec["outcome"] = "failure"
            self.drain(body)
            return
        service.imported(vdi, extents, task)
        rec["outcome"] = "success"
        self.drain(body)            # what follows the last chunk: XAPI ignores it

    def refuse(self, body, error):
        """Takes in the rest of the upload, then answers with the error."""
        self.drain(body)
        try:
            self.reply_text(error.status, error.message + "\n")
        except OSError:
            self.close_connection = True

    def drain(self, body):
        try:
            for _ in body:
                pass
        except (HttpError, OSError, ValueError):   # the client went away: nothing more to take in
            self.close_connection = True

    @staticmethod
    def raw_writes(body):
        """format=raw: the body is the disk's bytes from offset 0."""
        offset = 0
        for piece in body:
            yield offset, piece
            offset += len(piece)

    @staticmethod
    def chunked_writes(body, rec):
        """format=raw&chunked: vhd-tool's serve_chunked_to_raw (chunked.ml). Each chunk is a
        12-byte little-endian header {offset: uint64, len: uint32} and len bytes to write at
        offset; the chunk with offset 0 and len 0 ends the stream. A len of 0 elsewhere writes
        nothing. vhd-tool reads len as an OCaml Int32: 2 GiB or more is negative and fails."""
        while True:
            offset, length = CHUNK_HEADER.unpack(body.read_exact(CHUNK_HEADER.size))
            if offset == 0 and length == 0:
                return
            rec["chunks"] += 1
            if length >= 1 << 31:
                raise HttpError(400, f"chunk of {length} bytes: negative as vhd-tool's Int32")
            while length:
                piece = body.read_exact(min(length, 2 * MIB))
                yield offset, piece
                offset += len(piece)
                length -= len(piece)

    def receive_into(self, vdi, body, rec, chunked, fault=None, task=None):
        """Writes the body into the VDI, raw from offset 0 or chunk by chunk; returns the
        extents written. UploadFailed when the body writes past the VDI's end or breaks off
        (a short body, a client gone, no last chunk), when an armed ImportFault strikes or the
        task is cancelled."""
        total = int(self.headers.get("Content-Length") or 0)
        extents = []
        written = 0
        fd = os.open(vdi.path, os.O_WRONLY)
        try:
            for offset, data in (self.chunked_writes(body, rec) if chunked else self.raw_writes(body)):
                if task is not None and task.status == "cancelled":
                    raise UploadFailed(400, f"task {task.ref} was cancelled", extents)
                if offset + len(data) > vdi.virtual_size:
                    raise UploadFailed(400, f"a write at {offset} past the end of the {vdi.virtual_size}-byte "
                                            "VDI", extents)
                if fault is not None:
                    data = data[:fault.after_bytes - written]
                os.pwrite(fd, data, offset)
                if extents and extents[-1][0] + extents[-1][1] == offset:
                    extents[-1] = (extents[-1][0], extents[-1][1] + len(data))
                else:
                    extents.append((offset, len(data)))
                written += len(data)
                rec["data_bytes"] = written
                if fault is not None and written >= fault.after_bytes:
                    raise UploadFailed(500, f"injected I/O error after {written} bytes", extents)
                if task is not None:
                    self.server.service.import_progress(task, body.received, total)
        except UploadFailed:
            raise
        except (HttpError, OSError, ValueError) as e:   # a short body, a client gone, bad chunking
            raise UploadFailed(400, getattr(e, "message", None) or f"the upload broke off: {e}", extents)
        finally:
            os.close(fd)
        return extents


class Body:
    """A request body as it comes in, with the count of bytes taken in so far."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.buf = bytearray()
        self.received = 0

    def __iter__(self):
        if self.buf:
            piece, self.buf = bytes(self.buf), bytearray()
            yield piece
        for piece in self.pieces:
            self.received += len(piece)
            yield piece

    def read_exact(self, n):
        while len(self.buf) < n:
            piece = next(self.pieces, None)
            if piece is None:
                raise HttpError(400, f"the body ended {n - len(self.buf)} bytes early")
            self.received += len(piece)
            self.buf += piece
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class ControlHandler(Handler):
    def do_GET(self):
        url = urlsplit(self.path)
        self.answer(lambda: self.server.control.get(url.path, {k: v[0] for k, v in parse_qs(url.query).items()}))

    def do_POST(self):
        def run():
            raw = b"".join(self.body_chunks())
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError as e:
                raise HttpError(400, f"bad JSON: {e}")
            if not isinstance(body, dict):
                raise HttpError(400, "the body must be a JSON object")
            return self.server.control.post(urlsplit(self.path).path, body)
        self.answer(run)

    def answer(self, produce):
        try:
            status, result = 200, produce()
        except HttpError as e:
            status, result = e.status, {"error": e.message}
        except Exception as e:      # a bug: say so to the test rather than hang up
            log(traceback.format_exc())
            status, result = 500, {"error": f"{type(e).__name__}: {e}"}
        self.reply(status, json.dumps(result).encode(), "application/json")


class SlaveService:
    """A pool member's XAPI: it refuses logins with HOST_IS_SLAVE naming the master's
    address, as XAPI does; calls with a session go to the pool's state, as XAPI forwards
    them to the master."""

    def __init__(self, service, master_address):
        self.service = service
        self.host = service.host
        self.master_address = master_address

    def call(self, method, params, client_gone=lambda: False):
        if method == LOGIN:
            self.host.calls[method] += 1
            log(f"{method}: HOST_IS_SLAVE {self.master_address}")
            return Reply(200, method_response({"Status": "Failure",
                                               "ErrorDescription": ["HOST_IS_SLAVE", self.master_address]}))
        return self.service.call(method, params, client_gone)

    def __getattr__(self, name):        # imports and the rest: as the master
        return getattr(self.service, name)


class XapiServer(ThreadingHTTPServer):
    """HTTPS; the TLS handshake runs in the connection's own thread."""
    daemon_threads = True

    def __init__(self, address, service, certs, host_name="master", is_member=False):
        super().__init__(address, XapiHandler)
        self.service = service
        self.host_name = host_name
        self.is_member = is_member      # the pool member that sees every SR: never redirects
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs.cert_file, certs.key_file)

    def finish_request(self, request, client_address):
        request.settimeout(Handler.timeout)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log(f"TLS handshake with {client_address[0]} failed: {e}")
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class ControlServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, control):
        super().__init__(address, ControlHandler)
        self.control = control


# ----------------------------------------------------------------------------
# Start-up

def load_config(path):
    """Reads and checks the configuration; exits with a message if it is wrong."""
    def bad(message):
        raise SystemExit(f"xapi_sim: {path}: {message}")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        bad(str(e))
    config.setdefault("user", "root")
    config.setdefault("password", "")
    config.setdefault("nbd", "tls")
    config.setdefault("vms", [])
    config.setdefault("hosts", ["xapi-sim"])
    config.setdefault("nbd_limit", NBD_CONNECTION_LIMIT)
    if config["nbd"] not in NBD_MODES:
        bad(f"nbd must be one of {', '.join(NBD_MODES)}")
    hosts = config["hosts"]
    if (not isinstance(hosts, list) or not 1 <= len(hosts) <= MAX_HOSTS or len(set(hosts)) != len(hosts)
            or not all(isinstance(h, str) and h for h in hosts)):
        bad(f"hosts must be a list of 1 to {MAX_HOSTS} distinct names, the pool master first")
    if not isinstance(config["nbd_limit"], int) or config["nbd_limit"] < 0:
        bad("nbd_limit must be an integer, 0 or more")
    for vm in config["vms"]:
        if not vm.get("name"):
            bad("every VM needs a name")
        if vm.get("host", hosts[0]) not in hosts:
            bad(f"VM {vm['name']}: no host named {vm.get('host')!r}")
        for disk in vm.get("disks", []):
            if not disk.get("name") or not isinstance(disk.get("size"), int):
                bad(f"every disk of VM {vm['name']} needs a name and an integer size")
            if disk["size"] <= 0 or disk["size"] % SECTOR:
                bad(f"disk {disk['name']}: size must be a positive multiple of {SECTOR}")
            if disk.get("cbt") and disk.get("sr_type", "ext") not in CBT_SR_TYPES:
                bad(f"disk {disk['name']}: an SR of type {disk['sr_type']} has no CBT")
    return config


def write_ready(state_dir, info):
    path = os.path.join(state_dir, "ready.json")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)
    return path


def main():
    parser = argparse.ArgumentParser(description="XAPI simulator for the cbtfs tests")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, default=0, help="XML-RPC over HTTPS (0: any free port)")
    parser.add_argument("--control-port", type=int, default=0, help="JSON control API (0: any free port)")
    parser.add_argument("--member-port", type=int, default=0,
                        help="the same host as a pool member, where /import_redirect sends imports (0: any free port)")
    args = parser.parse_args()

    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    ready = os.path.join(state_dir, "ready.json")
    if os.path.exists(ready):
        os.unlink(ready)
    config = load_config(args.config)
    certs = make_certificates(state_dir)
    host = Host(state_dir, config, certs)
    service = XapiService(host)
    servers = [XapiServer(("127.0.0.1", args.port), service, certs),
               ControlServer(("127.0.0.1", args.control_port), ControlApi(host)),
               XapiServer(("127.0.0.1", args.member_port), service, certs, "member", is_member=True)]
    host.other_host = f"https://127.0.0.1:{servers[2].server_address[1]}"
    # The pool members: the master's port on their own loopback address.
    port = servers[0].server_address[1]
    members = [XapiServer((h.address, port), SlaveService(service, host.model.master().address), certs, h.name_label)
               for h in host.model.hosts()[1:]]
    servers += members

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    info = {"url": f"https://127.0.0.1:{servers[0].server_address[1]}", "ca_file": certs.ca_file,
            "control": f"http://127.0.0.1:{servers[1].server_address[1]}", "member": host.other_host,
            "hosts": {h.name_label: f"https://{h.address}:{port}" for h in host.model.hosts()},
            "pid": os.getpid()}
    write_ready(state_dir, info)
    log(f"ready: XML-RPC {info['url']}, control {info['control']}")

    while not stop.wait(0.5):
        pass
    log("stopping")
    for server in servers:
        server.shutdown()
        server.server_close()
    host.close()
    os.unlink(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
