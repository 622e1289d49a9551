"""Starts the XAPI simulator for a test and drives its control interface."""

import base64
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
import xmlrpc.client

SIM = os.path.join(os.path.dirname(__file__), "..", "xapi_sim", "xapi_sim.py")
PASSWORD = "s3cr3t-pw"


class Sim:
    def __init__(self, tmp, vms, nbd="tls", **config):
        self.dir = str(tmp / "sim")
        os.makedirs(self.dir, exist_ok=True)
        cfg = tmp / "sim.json"
        cfg.write_text(json.dumps({"user": "root", "password": PASSWORD, "nbd": nbd, "vms": vms, **config}))
        self.proc = subprocess.Popen(["/usr/bin/python3", SIM, "--state-dir", self.dir, "--config", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "sim.log"), "w"))
        ready = os.path.join(self.dir, "ready.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise AssertionError("simulator died: " + open(os.path.join(self.dir, "sim.log")).read())
            if time.monotonic() > deadline:
                raise AssertionError("simulator not ready in 30 s")
            time.sleep(0.05)
        info = json.load(open(ready))
        self.url, self.ca_file, self.control = info["url"], info["ca_file"], info["control"]
        self.member = info["member"]    # the pool member that sees the SR, for /import_redirect
        self.hosts = info["hosts"]      # {host name: XML-RPC URL}, the pool master first
        self.password_file = str(tmp / "password")
        with open(self.password_file, "w") as f:
            f.write(PASSWORD + "\n")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    # control interface
    def get(self, path):
        with urllib.request.urlopen(self.control + path, timeout=30) as r:
            return json.load(r)

    def post(self, path, body):
        req = urllib.request.Request(self.control + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)

    def state(self):
        return self.get("/state")

    def vdis(self):
        return self.state()["vdis"]

    def vdi(self, uuid):
        return next(v for v in self.vdis() if v["uuid"] == uuid)

    def disks_of(self, vm_name):
        vm = next(v for v in self.state()["vms"] if v["name"] == vm_name and not v.get("is_a_snapshot"))
        return [self.vdi(u) for u in vm["vdis"]]

    def snapshots_of(self, uuid):
        return [v for v in self.vdis() if v.get("snapshot_of") == uuid]

    def write(self, uuid, offset, data):
        self.post("/write", {"vdi": uuid, "offset": offset, "data_b64": base64.b64encode(data).decode()})

    def nbd_bytes(self, uuid):
        return self.get(f"/nbd_bytes?vdi={uuid}")["bytes"]

    def xapi(self):
        ctx = ssl.create_default_context(cafile=self.ca_file)
        proxy = xmlrpc.client.ServerProxy(self.url, context=ctx)
        session = proxy.session.login_with_password("root", PASSWORD, "1.0", "test")["Value"]
        return proxy, session
