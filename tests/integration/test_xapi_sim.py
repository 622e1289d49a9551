"""Tests of the XAPI simulator itself (tests/xapi_sim): XAPI's wire format and
errors, snapshots, CBT bitmaps computed from the data, data_destroy, fault
injection, real NBD over TLS served by nbdkit, and tasks (Async calls, imports
that report through a task). Self-contained: needs
/usr/bin/python3, openssl, nbdkit and libnbd-bin (nbdcopy, nbdinfo)."""

import base64
import http.client
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client

import pytest

SIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "xapi_sim", "xapi_sim.py")
BLOCK = 65536
MIB = 1 << 20
PASSWORD = "secret"
ODD_SIZE = 20 * BLOCK + 3 * 512         # 21 blocks, the last one partial

VMS = [
    {"name": "web01", "cd": True, "disks": [{"name": "root disk", "size": 4 * MIB},
                                            {"name": "data", "size": ODD_SIZE}]},
    {"name": "iso01", "disks": [{"name": "installer", "size": MIB, "sr_type": "iso"}]},
]


class XapiFailure(Exception):
    def __init__(self, description):
        super().__init__(description)
        self.description = description


class Sim:
    """One simulator process in its own state directory."""

    def __init__(self, tmp_path, nbd="tls", vms=VMS, **extra):
        self.dir = str(tmp_path / "state")
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"user": "root", "password": PASSWORD, "nbd": nbd, "vms": vms, **extra}))
        self.stderr = open(tmp_path / "sim.log", "w+")
        self.proc = subprocess.Popen(["/usr/bin/python3", SIM, "--state-dir", self.dir, "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        ready = os.path.join(self.dir, "ready.json")
        deadline = time.monotonic() + 20
        while not os.path.exists(ready):
            assert self.proc.poll() is None, f"simulator died: {self.log()}"
            assert time.monotonic() < deadline, "simulator not ready within 20 s"
            time.sleep(0.02)
        with open(ready) as f:
            self.info = json.load(f)
        self.context = ssl.create_default_context(cafile=self.info["ca_file"])
        self.proxy = xmlrpc.client.ServerProxy(self.info["url"], context=self.context)
        self.session = self.login()

    def log(self):
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self):
        """SIGTERM; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        return self.proc.returncode

    def nbdkit_pids(self):
        """nbdkit processes serving files of this simulator."""
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if os.path.basename(argv[0]) == b"nbdkit" and any(self.dir.encode() in a for a in argv):
                pids.append(int(pid))
        return pids

    # XML-RPC
    def login(self, password=PASSWORD):
        return self.value(self.proxy.session.login_with_password("root", password, "1.0", "test"))

    @staticmethod
    def value(response):
        if response["Status"] != "Success":
            raise XapiFailure(response["ErrorDescription"])
        return response["Value"]

    def call(self, method, *args):
        return self.value(getattr(self.proxy, method)(self.session, *args))

    def error(self, method, *args):
        with pytest.raises(XapiFailure) as e:
            self.call(method, *args)
        return e.value.description

    def raw(self, body, path="/"):
        """POSTs a raw body; returns (status, content type, text)."""
        url = urllib.parse.urlsplit(self.info["url"])
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=self.context, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "text/xml"})
            r = conn.getresponse()
            return r.status, r.getheader("Content-Type"), r.read().decode()
        finally:
            conn.close()

    # control API
    def get(self, path):
        with urllib.request.urlopen(self.info["control"] + path, timeout=30) as r:
            return json.load(r)

    def post(self, path, body):
        req = urllib.request.Request(self.info["control"] + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def vdi_state(self, uuid):
        return next(v for v in self.get("/state")["vdis"] if v["uuid"] == uuid)

    def disks(self, vm_name):
        vm = next(v for v in self.get("/state")["vms"] if v["name"] == vm_name)
        return [self.vdi_state(u) for u in vm["vdis"]]

    def write(self, uuid, offset, data):
        self.post("/write", {"vdi": uuid, "offset": offset, "data_b64": base64.b64encode(data).decode()})

    def ref(self, uuid):
        return self.call("VDI.get_by_uuid", uuid)

    def bitmap(self, vdi_from, vdi_to):
        return base64.b64decode(self.call("VDI.list_changed_blocks", vdi_from, vdi_to))


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path)
    yield s
    assert s.stop() == 0, s.log()
    assert s.nbdkit_pids() == []


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def blocks_of(bitmap):
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))}


def nbd_uri(info, tls_dir=None):
    export = urllib.parse.quote(info["exportname"], safe="/:=")
    uri = f"{'nbds' if tls_dir else 'nbd'}://{info['address']}:{info['port']}/{export}"
    return f"{uri}?tls-certificates={tls_dir}" if tls_dir else uri


def pin_certificate(info, directory):
    """Trusts exactly the certificate get_nbd_info returned, as libnbd wants it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ca-cert.pem"), "w") as f:
        f.write(info["cert"])
    return str(directory)


def nbdcopy(uri, dest):
    return subprocess.run(["nbdcopy", uri, str(dest)], capture_output=True, text=True, timeout=60)


def snapshot_with_cbt(sim, uuid):
    ref = sim.ref(uuid)
    sim.call("VDI.enable_cbt", ref)
    return ref, sim.call("VDI.snapshot", ref, {})


# --- sessions and generic errors -------------------------------------------------------

def test_login_logout_and_generic_errors(sim):
    assert sim.session.startswith("OpaqueRef:")
    with pytest.raises(XapiFailure) as e:
        sim.login("wrong")
    assert e.value.description == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]

    vm = sim.call("VM.get_by_name_label", "web01")[0]
    assert sim.error("VM.no_such_call", vm) == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_call"]
    assert sim.error("VM.get_record") == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "2", "1"]
    assert sim.error("VDI.get_record", vm) == ["HANDLE_INVALID", "VDI", vm]
    bogus = "7c4ab9a0-0000-4000-8000-000000000000"
    assert sim.error("VDI.get_by_uuid", bogus) == ["UUID_INVALID", "VDI", bogus]

    other = sim.login()
    assert sim.value(sim.proxy.session.logout(other)) == ""
    with pytest.raises(XapiFailure) as e:
        sim.value(sim.proxy.VM.get_record(other, vm))
    assert e.value.description == ["SESSION_INVALID", other]


def test_get_all_records_where_filters_as_xapis_database_does(sim):
    vm = sim.call("VM.get_by_name_label", "web01")[0]
    vbds = sim.call("VBD.get_all_records_where", f'field "VM" = "{vm}"')
    assert sorted(vbds) == sorted(sim.call("VM.get_VBDs", vm))
    assert all(r == sim.call("VBD.get_record", ref) for ref, r in vbds.items())
    disks = [r["VDI"] for r in vbds.values() if r["type"] == "Disk"]
    both = sim.call("VDI.get_all_records_where", " or ".join(f'field "_ref" = "{d}"' for d in disks))
    assert sorted(both) == sorted(disks)
    snap = sim.call("VDI.snapshot", disks[0], {})
    found = sim.call("VDI.get_all_records_where", f'field "snapshot_of" = "{disks[0]}" and not field "_ref" = "x"')
    assert list(found) == [snap] and found[snap]["is_a_snapshot"] is True
    assert list(sim.call("VM.get_all_records_where", 'field "name__label" = "web01"')) == [vm]
    assert sim.call("VM.get_all_records_where", 'field "name__label" = "web01" and field "is_a_snapshot" = "true"') == {}
    assert sim.call("VM.get_all_records_where", '(false or true) and field "is_control_domain" = "true"')
    assert sim.call("VDI.get_all_records_where", "false") == {}
    assert sim.error("VM.get_all_records_where", 'field "name__label" ==')[0] == "INTERNAL_ERROR"
    assert sim.error("VM.get_all_records_where", 'field "no_such_field" = "x"')[0] == "INTERNAL_ERROR"
    assert sim.error("VM.get_all_records_where")[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"


def test_wire_format_is_xapis_untyped_encoding(sim):
    status, ctype, text = sim.raw(
        "<?xml version='1.0'?><methodCall><methodName>session.login_with_password</methodName><params>"
        "<param><value>root</value></param><param><value><string>secret</string></value></param>"
        "<param><value>1.0</value></param><param><value/></param></params></methodCall>")
    assert (status, ctype) == (200, "text/xml")
    assert "<name>Status</name><value>Success</value>" in text
    session = text.split("<name>Value</name><value>")[1].split("</value>")[0]
    assert session.startswith("OpaqueRef:")

    uuid = sim.disks("web01")[0]["uuid"]
    status, _, text = sim.raw(
        f"<methodCall><methodName>VDI.get_record</methodName><params><param><value>{session}</value></param>"
        f"<param><value>{sim.ref(uuid)}</value></param></params></methodCall>", path="/RPC2")
    assert status == 200
    assert f"<name>uuid</name><value>{uuid}</value>" in text
    assert f"<name>virtual_size</name><value>{4 * MIB}</value>" in text
    assert "<name>type</name><value>user</value>" in text
    assert "<name>cbt_enabled</name><value><boolean>0</boolean></value>" in text
    assert "<name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601>" in text
    assert "<name>other_config</name><value><struct></struct></value>" in text
    for tag in ("<string>", "<i4>", "<i8>", "<int>", "<fault>"):
        assert tag not in text

    status, _, text = sim.raw("<methodCall><methodName>VDI.get_record</methodName><params><param>"
                              "<value><string>OpaqueRef:nope</string></value></param></params></methodCall>")
    assert status == 200
    assert ("<member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name>"
            "<value><array><data><value>MESSAGE_PARAMETER_COUNT_MISMATCH</value>") in text

    status, _, _ = sim.raw("<methodCall><methodName>VDI.get_record</methodName><params>")
    assert status == 500


# --- snapshots --------------------------------------------------------------------------

def test_vm_snapshot_of_two_disks_and_a_cd(sim):
    vm = sim.call("VM.get_by_name_label", "web01")[0]
    rec = sim.call("VM.get_record", vm)
    assert (rec["power_state"], rec["is_a_snapshot"], rec["is_control_domain"]) == ("Running", False, False)
    vbds = [sim.call("VBD.get_record", b) for b in rec["VBDs"]]
    assert [b["type"] for b in vbds] == ["Disk", "Disk", "CD"]
    assert vbds[2]["empty"] is True and vbds[2]["VDI"] == "OpaqueRef:NULL"
    disks = [b["VDI"] for b in vbds[:2]]
    root = sim.call("VDI.get_record", disks[0])
    sim.write(root["uuid"], 0, b"before")

    snap = sim.call("VM.snapshot", vm, "backup-1")
    sim.write(root["uuid"], 0, b"after!")
    srec = sim.call("VM.get_record", snap)
    assert (srec["is_a_snapshot"], srec["snapshot_of"], srec["name_label"]) == (True, vm, "backup-1")
    assert sim.call("VM.get_snapshots", vm) == [snap]
    svbds = [sim.call("VBD.get_record", b) for b in srec["VBDs"]]
    assert [b["type"] for b in svbds] == ["Disk", "Disk", "CD"]
    assert svbds[2]["empty"] is True and svbds[2]["VDI"] == "OpaqueRef:NULL"
    for orig, vbd in zip(disks, svbds[:2]):
        vdi = sim.call("VDI.get_record", vbd["VDI"])
        assert (vdi["is_a_snapshot"], vdi["snapshot_of"], vdi["type"]) == (True, orig, "user")
        assert vdi["virtual_size"] == sim.call("VDI.get_virtual_size", orig)
    snap_root = sim.vdi_state(sim.call("VDI.get_uuid", svbds[0]["VDI"]))
    assert read_file(snap_root["path"])[:6] == b"before"
    assert read_file(sim.vdi_state(root["uuid"])["path"])[:6] == b"after!"

    assert sim.error("VM.destroy", vm)[0] == "OPERATION_NOT_ALLOWED"
    sim.call("VM.destroy", snap)
    assert sim.call("VM.get_snapshots", vm) == []
    assert sim.call("VDI.get_is_a_snapshot", svbds[0]["VDI"]) is True   # the VDIs stay
    assert sim.error("VM.get_record", snap) == ["HANDLE_INVALID", "VM", snap]


# --- changed block tracking -------------------------------------------------------------

def test_changed_blocks_are_computed_from_the_data(sim):
    data = sim.disks("web01")[1]
    uuid, path = data["uuid"], data["path"]
    assert data["virtual_size"] == ODD_SIZE
    sim.post("/write", {"vdi": uuid, "offset": 0, "length": ODD_SIZE, "pattern": "random", "seed": 7})
    ref, snap_a = snapshot_with_cbt(sim, uuid)
    assert sim.call("VDI.get_cbt_enabled", snap_a) is True

    sim.write(uuid, 5 * BLOCK + 100, b"\x01")                          # one byte
    sim.write(uuid, 10 * BLOCK - 10, os.urandom(20))                    # across blocks 9 and 10
    sim.write(uuid, ODD_SIZE - 700, os.urandom(700))                    # the last, partial block
    sim.write(uuid, 2 * BLOCK, read_file(path)[2 * BLOCK:2 * BLOCK + 512])   # identical data again
    snap_b = sim.call("VDI.snapshot", ref, {})
    bitmap = sim.bitmap(snap_a, snap_b)
    assert len(bitmap) == 3                                             # ceil(21 / 8)
    assert bitmap == bytes([0x24, 0x60, 0x08])                          # blocks 2 5 | 9 10 | 20, MSB first

    with open(path, "r+b") as f:                                        # a guest write the log never saw
        f.seek(15 * BLOCK + 4096)
        f.write(b"\xff" * 512)
    snap_c = sim.call("VDI.snapshot", ref, {})
    assert blocks_of(sim.bitmap(snap_b, snap_c)) == {15}
    assert blocks_of(sim.bitmap(snap_a, snap_c)) == {2, 5, 9, 10, 15, 20}
    sim.write(uuid, 0, b"live")
    assert blocks_of(sim.bitmap(snap_c, ref)) == {0}                    # to = the live VDI

    unrelated = ["SR_BACKEND_FAILURE_460", "", "Source and target VDI are unrelated", ""]
    assert sim.error("VDI.list_changed_blocks", snap_b, snap_a) == unrelated
    assert sim.error("VDI.list_changed_blocks", snap_a, snap_a)[2] == "Source and target VDI are same"
    other = sim.disks("web01")[0]["uuid"]
    _, other_snap = snapshot_with_cbt(sim, other)
    assert sim.error("VDI.list_changed_blocks", snap_a, other_snap) == unrelated


def test_snapshot_without_cbt_has_no_metadata(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    ref = sim.ref(uuid)
    before = sim.call("VDI.snapshot", ref, {})
    assert sim.call("VDI.get_cbt_enabled", before) is False
    sim.call("VDI.enable_cbt", ref)
    sim.call("VDI.enable_cbt", ref)                                     # idempotent
    after = sim.call("VDI.snapshot", ref, {})
    assert sim.error("VDI.list_changed_blocks", before, after) == ["VDI_NO_CBT_METADATA", before]
    assert sim.error("VDI.data_destroy", before) == ["VDI_NO_CBT_METADATA", before]
    assert sim.error("VDI.enable_cbt", after) == ["OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {after}"]
    iso = sim.disks("iso01")[0]
    sr = sim.call("VDI.get_SR", sim.ref(iso["uuid"]))
    assert sim.error("VDI.enable_cbt", sim.ref(iso["uuid"])) == ["SR_OPERATION_NOT_SUPPORTED", sr]


def test_data_destroy_keeps_the_metadata_only(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    sim.write(uuid, 0, b"x" * 4096)
    ref, snap_a = snapshot_with_cbt(sim, uuid)
    path = sim.vdi_state(sim.call("VDI.get_uuid", snap_a))["path"]
    assert os.path.exists(path)

    assert sim.error("VDI.data_destroy", ref) == ["OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {ref}"]
    sim.call("VDI.data_destroy", snap_a)
    sim.call("VDI.data_destroy", snap_a)                                # idempotent
    assert sim.call("VDI.get_type", snap_a) == "cbt_metadata"
    assert sim.vdi_state(sim.call("VDI.get_uuid", snap_a))["path"] is None
    assert not os.path.exists(path)
    assert sim.error("VDI.get_nbd_info", snap_a) == ["VDI_INCOMPATIBLE_TYPE", snap_a, "cbt_metadata"]

    sim.write(uuid, 3 * BLOCK, b"y")
    snap_b = sim.call("VDI.snapshot", ref, {})
    assert blocks_of(sim.bitmap(snap_a, snap_b)) == {3}                 # the chain goes on

    sim.call("VDI.destroy", snap_a)
    assert sim.call("VDI.get_uuid", snap_b) in {v["uuid"] for v in sim.get("/state")["vdis"]}
    assert snap_a not in {v["ref"] for v in sim.get("/state")["vdis"]}
    assert sim.error("VDI.list_changed_blocks", snap_a, snap_b) == ["HANDLE_INVALID", "VDI", snap_a]
    assert sim.error("VDI.destroy", ref) == ["VDI_IN_USE", ref, "destroy"]  # attached to a running VM


def test_chain_breaks_and_resizes(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    ref, snap_a = snapshot_with_cbt(sim, uuid)
    sim.call("VDI.disable_cbt", ref)
    sim.call("VDI.disable_cbt", ref)                                    # idempotent
    sim.call("VDI.enable_cbt", ref)
    snap_b = sim.call("VDI.snapshot", ref, {})
    assert sim.error("VDI.list_changed_blocks", snap_a, snap_b) == \
        ["SR_BACKEND_FAILURE_460", "", "Source and target VDI are unrelated", ""]

    sim.post("/disable_cbt", {"vdi": uuid})                             # a storage migration
    assert sim.call("VDI.get_cbt_enabled", ref) is False
    assert sim.vdi_state(uuid)["cbt_enabled"] is False
    sim.call("VDI.enable_cbt", ref)
    snap_c = sim.call("VDI.snapshot", ref, {})
    assert sim.error("VDI.list_changed_blocks", snap_b, snap_c)[0] == "SR_BACKEND_FAILURE_460"

    sim.post("/resize", {"vdi": uuid, "size": 5 * MIB})
    assert sim.call("VDI.get_virtual_size", ref) == str(5 * MIB)
    snap_d = sim.call("VDI.snapshot", ref, {})
    bitmap = sim.bitmap(snap_c, snap_d)
    assert len(bitmap) == 80 // 8                                       # covers the new size
    assert blocks_of(bitmap) == set(range(64, 80))                      # the grown part counts as changed


def test_injected_failures_and_call_counts(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    ref, snap_a = snapshot_with_cbt(sim, uuid)
    snap_b = sim.call("VDI.snapshot", ref, {})
    sim.post("/reset_counters", {})
    injected = ["SR_BACKEND_FAILURE_460", "", "x", ""]
    sim.post("/fail", {"method": "VDI.list_changed_blocks", "error": injected, "count": 1})
    assert sim.error("VDI.list_changed_blocks", snap_a, snap_b) == injected
    assert blocks_of(sim.bitmap(snap_a, snap_b)) == set()               # only the next call failed

    sim.post("/fail", {"method": "VDI.snapshot", "http_status": 500, "count": 2})
    for _ in range(2):
        with pytest.raises(xmlrpc.client.ProtocolError) as e:
            sim.call("VDI.snapshot", ref, {})
        assert e.value.errcode == 500
    sim.post("/fail", {"method": "VDI.get_type", "delay": 0.5})
    start = time.monotonic()
    assert sim.call("VDI.get_type", ref) == "user"
    assert time.monotonic() - start >= 0.5
    calls = sim.get("/calls")
    assert calls["VDI.list_changed_blocks"] == 2 and calls["VDI.snapshot"] == 2 and calls["VDI.get_type"] == 1

    with pytest.raises(urllib.error.HTTPError) as e:
        sim.post("/fail", {"method": "VDI.snapshot"})
    assert e.value.code == 400


# --- NBD ---------------------------------------------------------------------------------

def test_nbd_over_tls_serves_the_snapshot(sim, tmp_path):
    uuid = sim.disks("web01")[0]["uuid"]
    sim.post("/write", {"vdi": uuid, "offset": 0, "length": 4 * MIB, "pattern": "random", "seed": 1})
    expected = read_file(sim.vdi_state(uuid)["path"])
    ref, snap = snapshot_with_cbt(sim, uuid)
    sim.write(uuid, 0, b"changed after the snapshot")
    snap_uuid = sim.call("VDI.get_uuid", snap)

    infos = sim.call("VDI.get_nbd_info", snap)
    assert len(infos) == 1
    info = infos[0]
    assert set(info) == {"exportname", "address", "port", "cert", "subject"}
    assert info["exportname"] == f"/{snap_uuid}?session_id={sim.session}"
    assert (info["address"], info["subject"]) == ("127.0.0.1", "localhost")
    assert info["port"].isdigit()                                       # int64 travels as a bare string
    assert info["cert"] == read_file(os.path.join(sim.dir, "server.pem")).decode()
    assert sim.call("VDI.get_nbd_info", snap) == infos                  # one server per VDI, reused
    assert sim.vdi_state(snap_uuid)["nbd_running"] is True

    pin = pin_certificate(info, tmp_path / "pin")
    size = subprocess.run(["nbdinfo", "--size", nbd_uri(info, pin)], capture_output=True, text=True, timeout=30)
    assert size.stdout.strip() == str(4 * MIB), size.stderr
    assert nbdcopy(nbd_uri(info), tmp_path / "plain.img").returncode != 0    # TLS is required
    sim.post("/reset_counters", {})
    copy = nbdcopy(nbd_uri(info, pin), tmp_path / "copy.img")
    assert copy.returncode == 0, copy.stderr
    assert read_file(tmp_path / "copy.img") == expected
    assert sim.get(f"/nbd_bytes?vdi={snap_uuid}")["bytes"] == 4 * MIB
    assert sim.get(f"/nbd_bytes?vdi={uuid}")["bytes"] == 4 * MIB       # the live VDI counts its snapshots

    wrong = tmp_path / "wrong"                                          # another certificate for localhost
    wrong.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(wrong / "key.pem"),
                    "-out", str(wrong / "ca-cert.pem")], check=True, capture_output=True)
    assert nbdcopy(nbd_uri(info, str(wrong)), tmp_path / "no.img").returncode != 0

    sim.call("VDI.data_destroy", snap)
    assert sim.vdi_state(snap_uuid)["nbd_running"] is False
    assert sim.nbdkit_pids() == []


def test_nbd_connection_drop_then_recovery(sim, tmp_path):
    uuid = sim.disks("web01")[0]["uuid"]
    sim.post("/write", {"vdi": uuid, "offset": 0, "length": 4 * MIB, "pattern": "random", "seed": 2})
    sim.post("/nbd_drop", {"vdi": uuid, "after_bytes": MIB})            # armed for the snapshots to come
    _, snap = snapshot_with_cbt(sim, uuid)
    snap_uuid = sim.call("VDI.get_uuid", snap)
    info = sim.call("VDI.get_nbd_info", snap)[0]
    pin = pin_certificate(info, tmp_path / "pin")

    failed = nbdcopy(nbd_uri(info, pin), tmp_path / "first.img")
    assert failed.returncode != 0
    served = sim.get(f"/nbd_bytes?vdi={snap_uuid}")["bytes"]
    assert 0 < served <= MIB

    again = nbdcopy(nbd_uri(info, pin), tmp_path / "second.img")     # same port, no longer armed
    assert again.returncode == 0, again.stderr
    assert read_file(tmp_path / "second.img") == read_file(sim.vdi_state(snap_uuid)["path"])
    assert sim.get(f"/nbd_bytes?vdi={snap_uuid}")["bytes"] == served + 4 * MIB


def test_vdi_in_use_while_an_nbd_client_is_connected(sim, tmp_path):
    uuid = sim.disks("web01")[0]["uuid"]
    sim.post("/write", {"vdi": uuid, "offset": 0, "length": 4 * MIB, "pattern": "random", "seed": 3})
    ref, snap_a = snapshot_with_cbt(sim, uuid)
    snap_b = sim.call("VDI.snapshot", ref, {})
    info = sim.call("VDI.get_nbd_info", snap_b)[0]
    pin = pin_certificate(info, tmp_path / "pin")
    # nbdcopy blocks on a pipe nobody reads: its connections stay open
    reader = subprocess.Popen(["nbdcopy", nbd_uri(info, pin), "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while sim.get(f"/nbd_bytes?vdi={sim.call('VDI.get_uuid', snap_b)}")["bytes"] == 0:
            assert time.monotonic() < deadline, "nbdcopy did not start reading"
            time.sleep(0.05)
        assert sim.error("VDI.list_changed_blocks", snap_a, snap_b) == ["VDI_IN_USE", snap_b]
        start = time.monotonic()
        assert sim.error("VDI.data_destroy", snap_b) == ["VDI_IN_USE", snap_b, "data_destroy"]
        assert time.monotonic() - start >= 3.5                           # XAPI waits a while first
    finally:
        reader.kill()
        reader.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            sim.call("VDI.data_destroy", snap_b)
            break
        except XapiFailure as e:
            assert e.description[0] == "VDI_IN_USE" and time.monotonic() < deadline
    assert sim.call("VDI.get_type", snap_b) == "cbt_metadata"


@pytest.mark.parametrize("mode", ["insecure", "none"])
def test_nbd_without_tls_and_without_nbd(tmp_path, mode):
    sim = Sim(tmp_path, nbd=mode)
    try:
        uuid = sim.disks("web01")[0]["uuid"]
        sim.write(uuid, 0, b"plain")
        snap = sim.call("VDI.snapshot", sim.ref(uuid), {})
        infos = sim.call("VDI.get_nbd_info", snap)
        if mode == "none":
            assert infos == []
        else:
            copy = nbdcopy(nbd_uri(infos[0]), tmp_path / "copy.img")
            assert copy.returncode == 0, copy.stderr
            assert read_file(tmp_path / "copy.img")[:5] == b"plain"
    finally:
        assert sim.stop() == 0
    assert sim.nbdkit_pids() == []


# --- restore side, shutdown ----------------------------------------------------------------

def test_vdi_create_and_import_raw_vdi(sim):
    srs = sim.call("SR.get_all")
    assert [sim.call("SR.get_name_label", s) for s in srs].count("Local storage") == 1
    sr = sim.call("SR.get_by_uuid", sim.call("SR.get_record", srs[0])["uuid"])
    ref = sim.call("VDI.create", {"name_label": "restored", "SR": sr, "virtual_size": str(MIB), "type": "user",
                                  "sharable": False, "read_only": False, "other_config": {}})
    rec = sim.call("VDI.get_record", ref)
    assert (rec["name_label"], rec["virtual_size"], rec["is_a_snapshot"]) == ("restored", str(MIB), False)

    body = random.Random(5).randbytes(MIB // 2)
    url = urllib.parse.urlsplit(sim.info["url"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=sim.context, timeout=30)
    for session, status in (("OpaqueRef:bad", 401), (sim.session, 200)):
        conn.request("PUT", f"/import_raw_vdi?session_id={session}&vdi={rec['uuid']}&format=raw", body=body)
        r = conn.getresponse()
        r.read()
        assert r.status == status
        conn.close()
    assert read_file(sim.vdi_state(rec["uuid"])["path"]) == body + bytes(MIB // 2)


def test_sigterm_stops_every_nbdkit(tmp_path):
    sim = Sim(tmp_path)
    for disk in sim.disks("web01"):
        sim.call("VDI.get_nbd_info", sim.ref(disk["uuid"]))
    deadline = time.monotonic() + 10                # get_nbd_info does not wait for nbdkit to start
    while len(sim.nbdkit_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sim.nbdkit_pids()) == 2
    assert sim.stop() == 0
    assert sim.nbdkit_pids() == []
    assert not os.path.exists(os.path.join(sim.dir, "ready.json"))
    assert "Traceback" not in sim.log()


# --- tasks: Async calls, task.*, imports that report through a task ---------------------------

def wait_task(sim, task, timeout=20):
    """Polls task.get_status as a client does; returns the final status."""
    deadline = time.monotonic() + timeout
    while (status := sim.call("task.get_status", task)) in ("pending", "cancelling"):
        assert time.monotonic() < deadline, f"task {task} still {status}"
        time.sleep(0.05)
    return status


def result_ref(result):
    """The ref in a task's result, the XML-RPC serialisation <value>OpaqueRef:...</value>."""
    assert result.startswith("<value>"), result
    return xmlrpc.client.loads(f"<methodResponse><params><param>{result}</param></params>"
                               "</methodResponse>")[0][0]


def post_call(sim, method, *params):
    """One XML-RPC POST, no retry (xmlrpc.client sends a call again when the connection drops)."""
    url = urllib.parse.urlsplit(sim.info["url"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=sim.context, timeout=30)
    try:
        conn.request("POST", "/", body=xmlrpc.client.dumps(params, method), headers={"Content-Type": "text/xml"})
        return conn.getresponse().read()
    finally:
        conn.close()


def put_import(sim, query, body):
    """PUT /import_raw_vdi; returns (status, task-id header, answer)."""
    url = urllib.parse.urlsplit(sim.info["url"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=sim.context, timeout=30)
    try:
        conn.request("PUT", "/import_raw_vdi?" + urllib.parse.urlencode(query), body=body)
        r = conn.getresponse()
        return r.status, r.getheader("task-id"), r.read()
    finally:
        conn.close()


def new_vdi(sim, size=MIB):
    sr = sim.call("SR.get_by_name_label", "Local storage")[0]
    ref = sim.call("VDI.create", {"name_label": "restored", "SR": sr, "virtual_size": str(size), "type": "user",
                                  "sharable": False, "read_only": False, "other_config": {}})
    return ref, sim.call("VDI.get_uuid", ref)


def test_async_snapshots_report_through_tasks(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    ref = sim.ref(uuid)
    sim.write(uuid, 0, b"async")
    task = sim.call("Async.VDI.snapshot", ref, {})
    assert task.startswith("OpaqueRef:") and task in sim.call("task.get_all")
    assert wait_task(sim, task) == "success"
    rec = sim.call("task.get_record", task)
    assert (rec["name_label"], rec["status"], rec["progress"], rec["error_info"]) == \
        ("Async.VDI.snapshot", "success", 1.0, [])
    assert str(rec["finished"]) >= str(rec["created"]) > "1970"
    assert sim.call("task.get_by_uuid", rec["uuid"]) == task
    snap = result_ref(sim.call("task.get_result", task))
    assert (sim.call("VDI.get_is_a_snapshot", snap), sim.call("VDI.get_snapshot_of", snap)) == (True, ref)
    assert read_file(sim.vdi_state(sim.call("VDI.get_uuid", snap))["path"])[:5] == b"async"
    assert {"uuid": rec["uuid"], "ref": task, "name": "Async.VDI.snapshot", "status": "success",
            "result": f"<value>{snap}</value>", "error_info": []} in sim.get("/state")["tasks"]

    vm = sim.call("VM.get_by_name_label", "web01")[0]
    task = sim.call("Async.VM.snapshot", vm, "async-backup")
    assert wait_task(sim, task) == "success"
    snap_vm = result_ref(sim.call("task.get_result", task))
    assert sim.call("VM.get_snapshot_of", snap_vm) == vm and sim.call("VM.get_name_label", snap_vm) == "async-backup"

    # Errors of the call itself fail the task; those of the dispatch answer the call.
    task = sim.call("Async.VDI.snapshot", snap, {})
    assert wait_task(sim, task) == "failure"
    assert sim.call("task.get_error_info", task)[0] == "OPERATION_NOT_ALLOWED"
    assert sim.call("task.get_result", task) == ""
    bogus = "OpaqueRef:4e0c9c9a-0000-4000-8000-000000000000"
    task = sim.call("Async.VDI.snapshot", bogus, {})
    assert wait_task(sim, task) == "failure"
    assert sim.call("task.get_error_info", task) == ["HANDLE_INVALID", "VDI", bogus]
    assert sim.error("Async.VDI.snapshot") == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "Async.VDI.snapshot", "3", "1"]
    assert sim.error("Async.VDI.get_nbd_info", ref) == ["MESSAGE_METHOD_UNKNOWN", "Async.VDI.get_nbd_info"]
    assert sim.error("task.get_status", bogus) == ["HANDLE_INVALID", "task", bogus]
    with pytest.raises(XapiFailure) as e:
        sim.value(sim.proxy.Async.VDI.snapshot("OpaqueRef:nosession", ref, {}))
    assert e.value.description == ["SESSION_INVALID", "OpaqueRef:nosession"]


def test_async_snapshot_whose_answer_is_lost_still_runs(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    ref = sim.ref(uuid)
    sim.post("/reset_counters", {})
    sim.post("/fail", {"method": "Async.VDI.snapshot", "no_answer": True})
    with pytest.raises(http.client.RemoteDisconnected):
        post_call(sim, "Async.VDI.snapshot", sim.session, ref, {})
    assert sim.get("/calls")["Async.VDI.snapshot"] == 1
    (task,) = sim.get("/state")["tasks"]                               # the client never learnt its ref
    assert task["name"] == "Async.VDI.snapshot"
    assert wait_task(sim, task["ref"]) == "success"
    assert [v["uuid"] for v in sim.get("/state")["vdis"] if v["snapshot_of"] == uuid] == \
        [sim.call("VDI.get_uuid", result_ref(sim.call("task.get_result", task["ref"])))]

    sim.post("/fail", {"method": "task.get_status", "error": ["INTERNAL_ERROR", "injected"]})
    assert sim.error("task.get_status", task["ref"]) == ["INTERNAL_ERROR", "injected"]
    assert sim.call("task.get_status", task["ref"]) == "success"


def test_task_delay_cancel_destroy_and_expiry(sim):
    uuid = sim.disks("web01")[0]["uuid"]
    ref = sim.ref(uuid)
    sim.post("/task_delay", {"method": "Async.VDI.snapshot", "seconds": 1.5})
    start = time.monotonic()
    slow = sim.call("Async.VDI.snapshot", ref, {})
    assert time.monotonic() - start < 1                                 # the call answers at once
    time.sleep(0.5)
    assert sim.call("task.get_status", slow) == "pending"
    assert sim.call("task.get_result", slow) == "" and sim.call("VDI.get_snapshots", ref) == []
    assert wait_task(sim, slow) == "success"
    assert time.monotonic() - start >= 1.5
    fast = sim.call("Async.VDI.snapshot", ref, {})                     # the delay was for one task
    assert wait_task(sim, fast, timeout=1) == "success"

    sim.post("/task_delay", {"method": "Async.VDI.snapshot", "seconds": 60, "count": 2})
    cancelled = sim.call("Async.VDI.snapshot", ref, {})
    sim.call("task.cancel", cancelled)
    assert sim.call("task.get_status", cancelled) == "cancelled"
    assert sim.call("task.get_error_info", cancelled) == ["TASK_CANCELLED", cancelled]
    sim.call("task.cancel", cancelled)                                  # a finished task: no effect
    sim.call("task.cancel", slow)
    assert sim.call("task.get_status", slow) == "success"
    doomed = sim.call("Async.VDI.snapshot", ref, {})
    sim.call("task.destroy", doomed)                                   # pending: it goes when it ends
    assert sim.call("task.get_current_operations", doomed) == {"task": "destroy"}
    snapshots = len(sim.call("VDI.get_snapshots", ref))
    sim.call("task.cancel", doomed)
    assert sim.error("task.get_status", doomed) == ["HANDLE_INVALID", "task", doomed]
    assert len(sim.call("VDI.get_snapshots", ref)) == snapshots == 2   # neither cancelled task snapshotted

    sim.call("task.destroy", fast)
    assert sim.error("task.get_record", fast) == ["HANDLE_INVALID", "task", fast]
    assert sim.error("task.destroy", fast) == ["HANDLE_INVALID", "task", fast]
    own = sim.call("task.create", "restore", "a client's own task")
    assert (sim.call("task.get_status", own), sim.call("task.get_name_description", own)) == \
        ("pending", "a client's own task")
    assert sim.post("/expire_tasks", {}) == {"expired": [slow, cancelled]}
    for gone in (slow, cancelled):
        assert sim.error("task.get_status", gone) == ["HANDLE_INVALID", "task", gone]
    assert sim.call("task.get_all") == [own]                            # a pending task stays
    assert [t["ref"] for t in sim.get("/state")["tasks"]] == [own]

    for bad in ({"method": "VDI.snapshot", "seconds": 1}, {"method": "Async.VDI.destroy", "seconds": 1},
                {"method": "Async.VDI.snapshot", "seconds": -1}):
        with pytest.raises(urllib.error.HTTPError) as e:
            sim.post("/task_delay", bad)
        assert e.value.code == 400


def test_import_reports_through_its_task(sim):
    vdi, vdi_uuid = new_vdi(sim)
    body = random.Random(6).randbytes(MIB // 2)
    task = sim.call("task.create", "restore", "")
    status, task_header, answer = put_import(sim, {"session_id": sim.session, "vdi": vdi, "format": "raw",
                                                   "task_id": task}, body)
    assert (status, task_header, answer) == (200, task, b"")
    assert sim.call("task.get_status", task) == "success"
    assert result_ref(sim.call("task.get_result", task)) == vdi
    assert read_file(sim.vdi_state(vdi_uuid)["path"]) == body + bytes(MIB // 2)

    # An I/O error partway: HTTP 200 all the same, the failure is in the task only.
    sim.post("/import_fail", {"after_bytes": 3 * BLOCK})
    task = sim.call("task.create", "restore", "")
    other = bytes([0xAB]) * (MIB // 2)
    status, _, _ = put_import(sim, {"session_id": sim.session, "vdi": vdi_uuid, "task_id": task}, other)
    assert status == 200
    assert sim.call("task.get_status", task) == "failure"
    assert sim.call("task.get_error_info", task) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert read_file(sim.vdi_state(vdi_uuid)["path"])[:MIB // 2] == other[:3 * BLOCK] + body[3 * BLOCK:]

    task = sim.call("task.create", "restore", "")                      # more than the VDI holds
    status, _, _ = put_import(sim, {"session_id": sim.session, "vdi": vdi, "task_id": task}, bytes(MIB + 512))
    assert status == 200
    assert sim.call("task.get_error_info", task) == ["VDI_IO_ERROR", "Device I/O errors"]

    task = sim.call("task.create", "restore", "")                      # the client goes away partway
    url = urllib.parse.urlsplit(sim.info["url"])
    with sim.context.wrap_socket(socket.create_connection((url.hostname, url.port)),
                                 server_hostname=url.hostname) as s:
        s.sendall(f"PUT /import_raw_vdi?session_id={sim.session}&vdi={vdi}&task_id={task} HTTP/1.1\r\n"
                  f"Host: {url.hostname}\r\nContent-Length: {MIB}\r\n\r\n".encode() + bytes(1000))
        assert s.recv(1024).startswith(b"HTTP/1.1 200 ")                # answered before the body came
    assert wait_task(sim, task) == "failure"
    assert sim.call("task.get_error_info", task) == ["VDI_IO_ERROR", "Device I/O errors"]

    task = sim.call("task.create", "restore", "")                      # refused before the body
    bogus = "7c4ab9a0-0000-4000-8000-000000000000"
    status, _, _ = put_import(sim, {"session_id": sim.session, "vdi": bogus, "task_id": task}, b"x")
    assert status == 404
    assert sim.call("task.get_error_info", task) == ["UUID_INVALID", "VDI", bogus]
    status, _, _ = put_import(sim, {"session_id": sim.session, "vdi": vdi, "task_id": "OpaqueRef:nope"}, b"x")
    assert status == 404

    sim.post("/import_fail", {"after_bytes": 0})                        # without a task: 200, as XAPI
    status, _, answer = put_import(sim, {"session_id": sim.session, "vdi": vdi}, b"y" * 4096)
    assert status == 200                                                # (the failure is only logged)
    assert [t["status"] for t in sim.get("/state")["tasks"]] == ["success", "failure", "failure", "failure",
                                                                  "failure"]


# --- sparse imports (format=raw&chunked=true), redirects to the host that sees the SR ---------

def chunk(offset, data):
    """One chunk of a chunked raw import, as vhd-tool's chunked.ml reads it."""
    return offset.to_bytes(8, "little") + len(data).to_bytes(4, "little") + data


LAST_CHUNK = bytes(12)                                                  # offset 0, length 0


def imports(sim):
    return sim.get("/imports")["imports"]


def test_chunked_import_writes_only_its_chunks(sim):
    vdi, vdi_uuid = new_vdi(sim, 4 * MIB)
    rnd = random.Random(7)
    old = rnd.randbytes(4 * MIB)
    task = sim.call("task.create", "restore", "")
    assert put_import(sim, {"session_id": sim.session, "vdi": vdi, "task_id": task}, old)[0] == 200
    assert wait_task(sim, task) == "success"
    sim.post("/reset_counters", {})

    a, b = rnd.randbytes(1000), rnd.randbytes(3 * MIB + 4096)           # b: more than vhd-tool's 2 MiB reads
    body = chunk(3 * MIB // 4, a) + chunk(5 * 512, b"") + chunk(512, b) + LAST_CHUNK
    task = sim.call("task.create", "restore", "")
    status, task_header, _ = put_import(sim, {"session_id": sim.session, "vdi": vdi, "format": "raw",
                                              "chunked": "true", "task_id": task}, body)
    assert (status, task_header) == (200, task)
    assert wait_task(sim, task) == "success"
    assert result_ref(sim.call("task.get_result", task)) == vdi
    expect = bytearray(old)
    expect[3 * MIB // 4:3 * MIB // 4 + 1000] = a
    expect[512:512 + len(b)] = b
    assert read_file(sim.vdi_state(vdi_uuid)["path"]) == bytes(expect)  # the rest is as it was: no zeros sent
    (rec,) = imports(sim)
    assert rec == {"vdi": vdi, "task": task, "host": "master", "http_host": "127.0.0.1:" + sim.info["url"].split(":")[-1],
                   "chunked": True, "outcome": "success",
                   "redirected_to": None, "body_bytes": len(body), "data_bytes": 1000 + len(b), "chunks": 3}

    def failed(body, **extra):
        task = sim.call("task.create", "restore", "")
        status, _, _ = put_import(sim, {"session_id": sim.session, "vdi": vdi_uuid, "chunked": "", "task_id": task,
                                        **extra}, body)
        assert status == 200
        assert wait_task(sim, task) == "failure"
        return sim.call("task.get_error_info", task)

    before = read_file(sim.vdi_state(vdi_uuid)["path"])
    # No last chunk, a chunk cut short, a header cut short: the stream broke off.
    assert failed(chunk(0, b"x" * 4096)) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert failed(chunk(0, b"y" * 4096)[:-1]) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert failed(chunk(0, b"z" * 4096) + LAST_CHUNK[:5]) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert read_file(sim.vdi_state(vdi_uuid)["path"])[:4096] == b"z" * 4096    # written before it broke off
    assert failed(chunk(4 * MIB - 512, bytes(1024)) + LAST_CHUNK) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert failed((0).to_bytes(8, "little") + (1 << 31).to_bytes(4, "little") + bytes(64) + LAST_CHUNK) == \
        ["VDI_IO_ERROR", "Device I/O errors"]                          # 2 GiB: negative as an Int32
    sim.post("/import_fail", {"after_bytes": 3 * BLOCK})
    assert failed(chunk(MIB, b"w" * (4 * BLOCK)) + LAST_CHUNK) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert read_file(sim.vdi_state(vdi_uuid)["path"])[MIB:MIB + 4 * BLOCK] == \
        b"w" * (3 * BLOCK) + before[MIB + 3 * BLOCK:MIB + 4 * BLOCK]
    # What follows the last chunk is not written.
    task = sim.call("task.create", "restore", "")
    put_import(sim, {"session_id": sim.session, "vdi": vdi, "chunked": "true", "task_id": task},
               LAST_CHUNK + chunk(0, b"after the end"))
    assert wait_task(sim, task) == "success"
    assert imports(sim)[-1]["data_bytes"] == 0

    # XAPI takes the body straight off the socket: an HTTP transfer encoding is refused.
    task = sim.call("task.create", "restore", "")
    url = urllib.parse.urlsplit(sim.info["url"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=sim.context, timeout=30)
    conn.request("PUT", "/import_raw_vdi?" + urllib.parse.urlencode(
        {"session_id": sim.session, "vdi": vdi, "format": "raw", "chunked": "true", "task_id": task}),
        body=iter([chunk(0, b"te"), LAST_CHUNK]), encode_chunked=True)
    assert conn.getresponse().status == 404
    conn.close()
    assert sim.call("task.get_error_info", task) == ["INTERNAL_ERROR", "Cannot handle encoding: chunked"]


def put_expecting(sim, base, target, body):
    """PUT with Expect: 100-continue, as libcurl sends it: the body only after a 100 Continue.
    Returns (status, headers, body bytes sent)."""
    url = urllib.parse.urlsplit(base)
    with sim.context.wrap_socket(socket.create_connection((url.hostname, url.port), timeout=30),
                                 server_hostname=url.hostname) as s:
        s.sendall(f"PUT {target} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Length: {len(body)}\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        f = s.makefile("rb")
        line = f.readline()
        sent = 0
        if line.startswith(b"HTTP/1.1 100 "):
            while f.readline().strip():
                pass
            s.sendall(body)
            sent = len(body)
            line = f.readline()
        headers = {}
        while (h := f.readline().strip()):
            k, v = h.decode().split(":", 1)
            headers[k.lower()] = v.strip()
        return int(line.split()[1]), headers, sent


def test_an_import_is_redirected_to_the_host_that_sees_the_sr(sim):
    vdi, vdi_uuid = new_vdi(sim)
    data = random.Random(8).randbytes(64 * 1024)
    body = chunk(4096, data) + LAST_CHUNK
    task = sim.call("task.create", "restore", "")
    query = urllib.parse.urlencode({"session_id": sim.session, "vdi": vdi, "format": "raw", "chunked": "true",
                                    "task_id": task})
    assert sim.post("/import_redirect", {}) == {"to": sim.info["member"], "count": 1}
    # The 302 comes at once, before any 100 Continue: the body is never sent to this host.
    status, headers, sent = put_expecting(sim, sim.info["url"], "/import_raw_vdi?" + query, body)
    assert (status, headers["location"], sent) == (302, f"{sim.info['member']}/import_raw_vdi?{query}", 0)
    assert sim.call("task.get_status", task) == "pending"               # the task is the other host's to end
    status, _, sent = put_expecting(sim, sim.info["member"], "/import_raw_vdi?" + query, body)
    assert (status, sent) == (200, len(body))
    assert wait_task(sim, task) == "success"
    assert read_file(sim.vdi_state(vdi_uuid)["path"])[:4096 + len(data) + 1] == bytes(4096) + data + b"\0"
    assert [(r["host"], r["outcome"], r["body_bytes"], r["redirected_to"]) for r in imports(sim)] == \
        [("master", "redirected", 0, f"{sim.info['member']}/import_raw_vdi?{query}"),
         ("member", "success", len(body), None)]

    # The rule was for one import; a bad session is answered 401 before any redirect.
    sim.post("/import_redirect", {"to": "https://127.0.0.1:1", "count": 2})
    assert put_import(sim, {"session_id": "OpaqueRef:bad", "vdi": vdi}, b"")[0] == 401
    status, headers, _ = put_expecting(sim, sim.info["url"], "/import_raw_vdi?session_id=x", b"")
    assert status == 401
    status, headers, _ = put_expecting(sim, sim.info["url"], "/import_raw_vdi?" + query, body)
    assert (status, headers["location"]) == (302, f"https://127.0.0.1:1/import_raw_vdi?{query}")
    status, headers, _ = put_expecting(sim, sim.info["url"], "/import_raw_vdi?" + query, body)
    assert (status, headers["location"]) == (302, f"https://127.0.0.1:1/import_raw_vdi?{query}")
    task2 = sim.call("task.create", "restore", "")
    assert put_import(sim, {"session_id": sim.session, "vdi": vdi, "chunked": "1", "task_id": task2}, body)[0] == 200
    assert wait_task(sim, task2) == "success"
    with pytest.raises(urllib.error.HTTPError) as e:
        sim.post("/import_redirect", {"to": "ftp://x"})
    assert e.value.code == 400


def test_power_state_and_an_import_into_a_vms_own_disk_is_logged_by_cbt(sim):
    """What cbtfs-repo rollback relies on: VM power states seen through VBDs, and a chunked
    import into an existing disk that CBT logs like a guest's writes."""
    vm = next(v for v in sim.get("/state")["vms"] if v["name"] == "web01")
    vm_ref = sim.call("VM.get_by_uuid", vm["uuid"])
    uuid = vm["vdis"][0]
    ref = sim.ref(uuid)
    (vbd,) = [b for b in sim.call("VDI.get_VBDs", ref)]
    assert sim.call("VM.get_power_state", vm_ref) == "Running"
    assert sim.call("VBD.get_currently_attached", vbd) is True
    for state, attached in (("Suspended", False), ("Paused", True), ("Halted", False)):
        assert sim.post("/power_state", {"vm": vm["uuid"], "state": state}) == \
            {"vm": vm["uuid"], "power_state": state}
        assert sim.call("VM.get_power_state", vm_ref) == state
        assert sim.call("VM.get_record", vm_ref)["power_state"] == state
        assert sim.call("VBD.get_currently_attached", vbd) is attached
    with pytest.raises(urllib.error.HTTPError) as e:
        sim.post("/power_state", {"vm": vm["uuid"], "state": "Crashed"})
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        sim.post("/power_state", {"vm": "00000000-0000-0000-0000-000000000000", "state": "Halted"})
    assert e.value.code == 404
    snap_vm = sim.call("VM.snapshot", vm_ref, "s")
    with pytest.raises(urllib.error.HTTPError) as e:
        sim.post("/power_state", {"vm": sim.call("VM.get_uuid", snap_vm), "state": "Running"})
    assert e.value.code == 400
    assert sim.call("VM.get_power_state", snap_vm) == "Halted"

    # A halted VM's disk takes a chunked import; CBT logs it, identical bytes too.
    sim.write(uuid, 0, b"a" * BLOCK * 2)
    _, base = snapshot_with_cbt(sim, uuid)
    body = chunk(5 * BLOCK + 100, b"b" * 10) + chunk(0, b"a" * 512) + LAST_CHUNK
    task = sim.call("task.create", "rollback", "")
    status, _, _ = put_import(sim, {"session_id": sim.session, "vdi": ref, "format": "raw", "chunked": "true",
                                    "task_id": task}, body)
    assert status == 200 and wait_task(sim, task) == "success"
    after = sim.call("VDI.snapshot", ref, {})
    assert blocks_of(sim.bitmap(base, after)) == {0, 5}
    assert read_file(sim.vdi_state(uuid)["path"])[5 * BLOCK + 100:5 * BLOCK + 110] == b"b" * 10
    sim.post("/power_state", {"vm": vm["uuid"], "state": "Running"})
    assert sim.call("VBD.get_currently_attached", vbd) is True


def test_pool_of_hosts_with_nbd_limits_and_objects_no_backup_selects(tmp_path):
    """Three hosts: members answer HOST_IS_SLAVE; each host's xapi-nbd refuses connections
    past its limit right after accepting them (no greeting) and counts the peak; get_nbd_info
    lists the hosts that see the SR; templates, tags, dom0 disks and ISO CDs are there."""
    import nbd  # python3-libnbd
    vms = [{"name": "a", "host": "h2", "tags": ["gold", "web"], "cd": "iso",
            "disks": [{"name": "local", "size": 2 * MIB}, {"name": "shared", "size": MIB, "shared": True}]},
           {"name": "tpl", "template": True, "disks": [{"name": "t", "size": MIB}]}]
    sim = Sim(tmp_path, nbd="insecure", vms=vms, hosts=["h1", "h2", "h3"], nbd_limit=2, control_domain_disk=MIB)
    try:
        assert set(sim.info["hosts"]) == {"h1", "h2", "h3"}
        for name, url in sim.info["hosts"].items():
            proxy = xmlrpc.client.ServerProxy(url, context=sim.context)
            answer = proxy.session.login_with_password("root", PASSWORD, "1.0", "test")
            if name == "h1":
                assert answer["Status"] == "Success"
            else:
                assert answer["ErrorDescription"] == ["HOST_IS_SLAVE", "127.0.0.1"]
        hosts = sim.call("host.get_all_records")
        address = {ref: h["address"] for ref, h in hosts.items()}
        records = sim.call("VM.get_all_records")
        by_name = {r["name_label"]: r for r in records.values()}
        assert by_name["a"]["tags"] == ["gold", "web"] and address[by_name["a"]["resident_on"]] == "127.0.0.2"
        assert by_name["tpl"]["is_a_template"] and not by_name["tpl"]["is_a_snapshot"]
        dom0s = [r for r in records.values() if r["is_control_domain"]]
        assert len(dom0s) == 3 and all(len(r["VBDs"]) == 1 for r in dom0s)
        cds = [sim.call("VBD.get_record", b) for b in by_name["a"]["VBDs"]]
        cd = next(b for b in cds if b["type"] == "CD")
        assert not cd["empty"] and sim.call("SR.get_type", sim.call("VDI.get_SR", cd["VDI"])) == "iso"

        local, shared = sim.disks("a")
        infos = sim.call("VDI.get_nbd_info", sim.ref(local["uuid"]))
        assert [i["address"] for i in infos] == ["127.0.0.2"]
        assert sorted(i["address"] for i in sim.call("VDI.get_nbd_info", sim.ref(shared["uuid"]))) == \
            ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

        handles, refused = [], []
        for _ in range(3):
            h = nbd.NBD()
            try:
                h.connect_tcp(infos[0]["address"], str(infos[0]["port"]))
                assert h.get_size() == 2 * MIB
                handles.append(h)
            except nbd.Error as e:
                refused.append(str(e))
        assert len(handles) == 2 and len(refused) == 1 and "disconnected" in refused[0]
        counters = {h["name"]: h for h in sim.get("/nbd_hosts")["hosts"]}
        assert counters["h2"]["open"] == 2 and counters["h2"]["peak"] == 3 and counters["h2"]["busy"] == 1
        assert counters["h1"]["peak"] == 0 and counters["h3"]["peak"] == 0
        for h in handles:
            h.shutdown()
        sim.post("/nbd_limit", {"host": "h2", "limit": 3})
        deadline = time.monotonic() + 10
        while sim.get("/nbd_hosts")["hosts"][1]["open"]:
            assert time.monotonic() < deadline, "the closed connections stay counted"
            time.sleep(0.05)
        sim.post("/reset_counters", {})
        assert sim.get("/nbd_hosts")["hosts"][1] == {"name": "h2", "address": "127.0.0.2", "limit": 3, "open": 0,
                                                    "peak": 0, "busy": 0, "served": 0}
    finally:
        assert sim.stop() == 0
