"""cbtfs-ingest at pool scale against the XAPI simulator: several hosts, each
with xapi-nbd's connection limit (the simulator counts the connections every
host saw at once), real HTTPS XML-RPC and real nbdkit. Disks are a few MiB
and sparse: what is tested is the bookkeeping, not the bandwidth."""

import json
import os
import subprocess
import time

import pytest

from xapi import Sim

BUILD_SRC = os.path.join(os.environ.get("CBTFS_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build")), "src")
INGEST = os.path.abspath(os.path.join(BUILD_SRC, "cbtfs-ingest"))
MIB = 1 << 20
BLOCK = 65536


def ingest(sim, repo, *args, check=True, url=None):
    cmd = [INGEST, "--xapi", url or sim.url, "--user", "root", "--password-file", sim.password_file,
           "--ca-file", sim.ca_file, "--json"]
    p = subprocess.run(cmd + [str(a) for a in args] + [str(repo)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"cbtfs-ingest failed with {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p, json.loads(p.stdout) if p.stdout.strip() else None


def nbd_hosts(sim):
    return {h["name"]: h for h in sim.get("/nbd_hosts")["hosts"]}


def data_snapshots(sim):
    return [v for v in sim.vdis() if v.get("is_a_snapshot") and v["type"] != "cbt_metadata"]


def test_a_busy_nbd_server_is_waited_out_then_a_clear_error(tmp_path, repo):
    """The host serves 2 connections, cbtfs may open 4: a transfer that finds the
    server busy waits for it instead of failing; one that never gets in fails with
    a message that says why, and leaves no snapshot with data behind."""
    vms = [{"name": f"vm{i}", "disks": [{"name": "d", "size": 16 * MIB}]} for i in range(3)]
    sim = Sim(tmp_path, vms, nbd_limit=2)
    try:
        for vm in vms:
            uuid = sim.disks_of(vm["name"])[0]["uuid"]
            sim.write(uuid, 0, b"x" * BLOCK)
            # Slow reads keep the transfers (8 requests of 2 MiB each) going at once.
            sim.post("/nbd_faults", {"vdi": uuid, "read_delay_ms": 150})
        p, summary = ingest(sim, repo, *(a for vm in vms for a in ("--vm", vm["name"])),
                            "--jobs", 3, "--connections", 4, "--host-connections", 4, "--busy-timeout", 60)
        assert summary["ok"] and len(summary["vdis"]) == 3 and all(v["full"] for v in summary["vdis"])
        counters = nbd_hosts(sim)["xapi-sim"]
        assert counters["busy"] > 0, counters          # the server did say busy
        assert 2 < counters["peak"] <= 4, counters       # cbtfs tried past the server's limit, never past its own
        assert "is busy" in p.stderr

        sim.write(sim.disks_of("vm0")[0]["uuid"], 3 * MIB, b"y" * BLOCK)
        sim.post("/nbd_limit", {"limit": 0})           # another tool holds every connection
        start = time.monotonic()
        p, summary = ingest(sim, repo, "--vm", "vm0", "--busy-timeout", 3, check=False)
        assert p.returncode == 1
        assert time.monotonic() - start < 60
        (vdi,) = summary["vdis"]
        assert not vdi["ok"] and "refused every NBD connection for 3 s" in vdi["error"], vdi
        assert "--host-connections" in vdi["error"]
        assert not data_snapshots(sim)
    finally:
        sim.stop()


def pool_config(n_vms):
    """n_vms VMs of two 4 MiB disks on three hosts; every fifth VM's second disk on
    shared storage (any host can serve it); tags "gold" (every tenth VM) and "dev"
    (every seventh). Then what must never be selected: a template, an ISO-only VM
    (reported: no disk can have CBT), an ISO in a CD drive, a disk in each dom0."""
    hosts = ["h1", "h2", "h3"]
    vms = []
    for i in range(n_vms):
        tags = (["gold"] if i % 10 == 0 else []) + (["dev"] if i % 7 == 0 else [])
        vms.append({"name": f"vm{i:02}", "host": hosts[i % 3], "tags": tags, "cd": "iso" if i == 1 else False,
                    "disks": [{"name": "root", "size": 4 * MIB},
                              {"name": "data", "size": 4 * MIB, "shared": i % 5 == 0}]})
    vms.append({"name": "tpl", "template": True, "tags": ["gold"], "disks": [{"name": "t", "size": MIB}]})
    vms.append({"name": "isovm", "host": "h2", "disks": [{"name": "installer", "size": MIB, "sr_type": "iso"}]})
    return dict(vms=vms, hosts=hosts, control_domain_disk=MIB)


def test_fifty_vms_on_three_hosts_within_the_connection_budget(tmp_path, repo):
    sim = Sim(tmp_path, **pool_config(50))
    try:
        state = sim.state()
        address = {h["name"]: h["address"] for h in state["hosts"]}
        vms = {v["name"]: v for v in state["vms"] if not v["is_a_snapshot"]}
        disks = {v["uuid"]: v for v in state["vdis"]}
        backed = {u: vm for vm in vms.values() if vm["name"].startswith("vm") for u in vm["vdis"]}
        assert len(backed) == 100
        proxy, session = sim.xapi()
        vm_ref = proxy.VM.get_by_uuid(session, vms["vm03"]["uuid"])["Value"]
        assert proxy.VM.snapshot(session, vm_ref, "an admin's snapshot")["Status"] == "Success"
        admins = {v["uuid"] for v in data_snapshots(sim)}
        assert len(admins) == 2
        for u in backed:
            sim.write(u, 0, u.encode() * 8)
            # Every read waits 20 ms, so that the transfers of a host overlap and want more
            # connections than the budget gives.
            sim.post("/nbd_faults", {"vdi": u, "read_delay_ms": 20})

        start = time.monotonic()
        p, summary = ingest(sim, repo, "--all", "--jobs", 8, "--connections", 4, "--host-connections", 3)
        first_run = time.monotonic() - start
        got = {v["vdi_uuid"]: v for v in summary["vdis"]}
        assert set(got) == set(backed), "every disk of every VM, nothing else"
        assert all(v["ok"] and v["full"] and v["point"] for v in got.values())
        for u, v in got.items():
            if not disks[u]["sr_shared"]:    # local storage: only its own host can serve it
                assert v["nbd_host"] in (address[backed[u]["host"]], "localhost"), v
        shared_hosts = {v["nbd_host"] for u, v in got.items() if disks[u]["sr_shared"]}
        assert len(shared_hosts) > 1, f"the shared disks were all read from {shared_hosts}"
        skipped = {(s["vm_name"], s["vdi_name"]) for s in summary["skipped"]}
        assert ("isovm", "installer") in skipped and ("isovm", "") in skipped, summary["skipped"]
        assert "WARNING: not backed up" in p.stderr and "SR_OPERATION_NOT_SUPPORTED" in p.stderr
        counters = nbd_hosts(sim)
        print("first run, NBD connections per host:", json.dumps(counters))
        assert all(c["peak"] <= 3 and c["busy"] == 0 for c in counters.values()), json.dumps(counters)
        assert max(c["peak"] for c in counters.values()) == 3, counters   # the budget was what held them back
        assert {v["uuid"] for v in data_snapshots(sim)} == admins, "ours are metadata-only, the admin's untouched"

        changed = list(backed)[::9]
        for u in changed:
            sim.write(u, 3 * MIB + 5, b"changed")
        sim.post("/reset_counters", {})
        start = time.monotonic()
        p, summary = ingest(sim, repo, "--all", "--jobs", 8, "--connections", 4, "--host-connections", 3)
        second_run = time.monotonic() - start
        got = {v["vdi_uuid"]: v for v in summary["vdis"]}
        assert set(got) == set(backed)
        assert all(v["ok"] and not v["full"] for v in got.values()), [v for v in got.values() if v["full"]]
        assert {u for u, v in got.items() if v["blocks_read"]} == set(changed)
        assert all(got[u]["blocks_read"] == 1 for u in changed)
        assert all(c["peak"] <= 3 and c["busy"] == 0 for c in nbd_hosts(sim).values())

        # Tags and exclusions: gold VMs (vm00, vm10, ...) but not vm20, and none also tagged dev;
        # asked of a pool member, which sends cbtfs-ingest to the master.
        p, summary = ingest(sim, repo, "--tag", "gold", "--exclude-vm", "vm20", "--exclude-tag", "dev",
                            url=sim.hosts["h3"])
        assert f"{sim.hosts['h3']} is a pool member; using the pool master at {sim.url}" in p.stderr
        assert sorted({v["vm_name"] for v in summary["vdis"]}) == ["vm10", "vm30", "vm40"]
        assert all(v["ok"] and not v["full"] for v in summary["vdis"])
        assert not summary["skipped"]
        print(f"pool of 100 disks: first run {first_run:.1f} s, second {second_run:.1f} s")
    finally:
        sim.stop()


def metrics(path):
    """{(name, frozenset of label items): value} of a Prometheus text file; checks that
    every sample's metric has its # TYPE line before it."""
    out, typed = {}, set()
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        assert name in typed, line
        items = []
        for part in labels.rstrip("}").split('",') if labels else []:
            k, v = part.split('="', 1)
            items.append((k, v.rstrip('"')))
        out[name, frozenset(items)] = float(value)
    return out


def of(samples, name, **labels):
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_metrics_file_and_json_carry_the_figures(tmp_path, repo):
    sim = Sim(tmp_path, [{"name": "a", "disks": [{"name": "a-root", "size": 4 * MIB}]},
                         {"name": "b", "disks": [{"name": "b-root", "size": 4 * MIB},
                                                 {"name": "b-data", "size": 4 * MIB}]}])
    prom = tmp_path / "textfile" / "cbtfs-ingest.prom"
    prom.parent.mkdir()
    try:
        a, b_root, b_data = sim.disks_of("a")[0], *sim.disks_of("b")
        for d in (a, b_root, b_data):
            sim.write(d["uuid"], MIB, os.urandom(3 * BLOCK))
        _, first = ingest(sim, repo, "--vm", "a", "--vm", "b", "--metrics-file", prom)
        m = metrics(prom)
        assert of(m, "cbtfs_ingest_run_success") == 1
        assert of(m, "cbtfs_ingest_run_vdis", outcome="ok") == 3
        for v in first["vdis"]:
            assert of(m, "cbtfs_ingest_vdi_read_bytes", vdi_uuid=v["vdi_uuid"]) == v["bytes_read"] == 4 * MIB
            assert of(m, "cbtfs_ingest_vdi_stored_bytes", vdi_uuid=v["vdi_uuid"]) == v["bytes_stored"] > 3 * BLOCK
            assert of(m, "cbtfs_ingest_vdi_duration_seconds", vdi_uuid=v["vdi_uuid"]) == pytest.approx(v["seconds"])
            assert of(m, "cbtfs_ingest_vdi_full", vdi_uuid=v["vdi_uuid"]) == 1
        first_time = {v["vdi_uuid"]: of(m, "cbtfs_ingest_vdi_last_success_timestamp_seconds", vdi_uuid=v["vdi_uuid"])
                      for v in first["vdis"]}
        assert all(abs(t - time.time()) < 120 for t in first_time.values())

        time.sleep(1.1)                                 # the next points get later times
        sim.post("/disable_cbt", {"vdi": b_data["uuid"]})        # as a storage migration does
        sim.write(b_root["uuid"], 0, b"z" * BLOCK)
        sim.post("/fail", {"method": "VDI.get_nbd_info", "error": ["INTERNAL_ERROR", "injected"], "count": 1})
        p, second = ingest(sim, repo, "--vm", "a", "--vm", "b", "--jobs", 1, "--metrics-file", prom, check=False)
        assert p.returncode == 1
        got = {v["vdi_uuid"]: v for v in second["vdis"]}
        assert not got[a["uuid"]]["ok"] and got[b_root["uuid"]]["ok"] and got[b_data["uuid"]]["ok"]
        assert got[b_data["uuid"]]["full"] and "disabled" in got[b_data["uuid"]]["chain_reason"]
        m = metrics(prom)
        assert of(m, "cbtfs_ingest_run_success") == 0
        assert of(m, "cbtfs_ingest_run_vdis", outcome="failed") == 1
        assert of(m, "cbtfs_ingest_run_chain_breaks") == 1
        assert of(m, "cbtfs_ingest_vdi_success", vdi_uuid=a["uuid"]) == 0
        # a failed disk keeps its last success: the point of the first run
        assert of(m, "cbtfs_ingest_vdi_last_success_timestamp_seconds", vdi_uuid=a["uuid"]) == first_time[a["uuid"]]
        later = of(m, "cbtfs_ingest_vdi_last_success_timestamp_seconds", vdi_uuid=b_root["uuid"])
        assert later > first_time[b_root["uuid"]]
        assert of(m, "cbtfs_ingest_vdi_read_bytes", vdi_uuid=b_root["uuid"]) == got[b_root["uuid"]]["bytes_read"] == BLOCK
        assert of(m, "cbtfs_ingest_vdi_full", vdi_uuid=b_root["uuid"]) == 0
        assert of(m, "cbtfs_ingest_vdi_chain_break", vdi_uuid=b_data["uuid"],
                  reason=got[b_data["uuid"]]["chain_reason"]) == 1
        assert of(m, "cbtfs_ingest_vm_success", vm_name="a") == 0
        assert of(m, "cbtfs_ingest_vm_success", vm_name="b") == 1
        assert of(m, "cbtfs_ingest_vm_last_success_timestamp_seconds", vm_name="a") == first_time[a["uuid"]]
        assert os.listdir(prom.parent) == [prom.name]   # replaced whole: no temporary file left
    finally:
        sim.stop()


def test_stale_metadata_snapshots_start_a_new_base_that_reuses_stored_blocks(tmp_path):
    """Each way the previous metadata-only snapshot goes stale gives one full point that
    says why and, in a format 2 repository, stores almost nothing new; the run after it
    is incremental again (the stale snapshot does not make every run a full one), and
    the host keeps one metadata-only snapshot of ours per disk. A snapshot a control
    domain still holds is reported with the commands to free it, not waited on."""
    cases = ["cbt_reenabled", "metadata_inconsistent", "snapshot_destroyed", "cbt_disabled"]
    sim = Sim(tmp_path, [{"name": c, "disks": [{"name": "d", "size": 4 * MIB}]} for c in cases + ["held"]])
    repo = tmp_path / "repo2"
    subprocess.run([os.path.join(BUILD_SRC, "cbtfs-repo"), "init", "--format", "2", str(repo)], check=True,
                   capture_output=True)
    try:
        disk = {c: sim.disks_of(c)[0]["uuid"] for c in cases + ["held"]}
        for u in disk.values():
            sim.write(u, 0, os.urandom(2 * MIB))
        everything = [a for c in disk for a in ("--vm", c)]
        ingest(sim, repo, *everything)
        proxy, session = sim.xapi()

        def ours(uuid):
            return [v for v in sim.snapshots_of(uuid) if v["name"].startswith("cbtfs-ingest ")]

        for case in cases:
            u = disk[case]
            sim.write(u, 3 * MIB, b"new data" * 100)
            ref = proxy.VDI.get_by_uuid(session, u)["Value"]
            if case == "cbt_reenabled":          # a storage migration, then CBT turned on again
                proxy.VDI.disable_cbt(session, ref)
                proxy.VDI.enable_cbt(session, ref)
                reason = "cannot relate the previous snapshot"
            elif case == "metadata_inconsistent":
                sim.post("/fail", {"method": "VDI.list_changed_blocks", "count": 1,
                                   "error": ["SR_BACKEND_FAILURE_459", "", "VDI_CBT_METADATA_INCONSISTENT", ""]})
                reason = "SR_BACKEND_FAILURE_459"
            elif case == "snapshot_destroyed":   # an admin's clean-up
                (snap,) = ours(u)
                proxy.VDI.destroy(session, proxy.VDI.get_by_uuid(session, snap["uuid"])["Value"])
                reason = "is gone from the host"
            else:
                sim.post("/disable_cbt", {"vdi": u})
                reason = "had been disabled"
            _, s = ingest(sim, repo, "--vm", case)
            (v,) = s["vdis"]
            assert v["ok"] and v["full"] and reason in v["chain_reason"], (case, v)
            assert v["bytes_read"] == 4 * MIB
            assert v["bytes_stored"] < 64 * 1024, (case, v["bytes_stored"])   # the new base re-uses stored blocks
            _, s = ingest(sim, repo, "--vm", case)
            (v,) = s["vdis"]
            assert v["ok"] and not v["full"] and v["blocks_read"] == 0, (case, v)
            snaps = ours(u)
            assert len(snaps) == 1 and snaps[0]["type"] == "cbt_metadata", (case, snaps)

        # A VDI forgotten by the repository: its metadata-only snapshot starts nothing any more,
        # and goes once the new first point is committed.
        u = disk["cbt_disabled"]
        (old,) = ours(u)
        subprocess.run([os.path.join(BUILD_SRC, "cbtfs-repo"), "forget", str(repo), u], check=True, capture_output=True)
        _, s = ingest(sim, repo, "--vm", "cbt_disabled")
        (v,) = s["vdis"]
        assert v["ok"] and v["full"] and not v["chain_reason"]
        assert [x["uuid"] for x in ours(u)] == [v["snapshot_uuid"]] != [old["uuid"]]

        # A snapshot of ours with its data, left plugged into dom0 by a transfer that was cut off.
        u = disk["held"]
        (meta,) = ours(u)
        ref = proxy.VDI.get_by_uuid(session, u)["Value"]
        left = proxy.VDI.snapshot(session, ref, {})["Value"]
        proxy.VDI.set_name_label(session, left, meta["name"])
        left_uuid = proxy.VDI.get_uuid(session, left)["Value"]
        vbd = sim.post("/dom0_attach", {"vdi": left_uuid})["vbd"]
        start = time.monotonic()
        p, s = ingest(sim, repo, "--vm", "held")
        assert time.monotonic() - start < 20, "it waited for the held snapshot"
        (v,) = s["vdis"]
        assert v["ok"] and not v["full"]
        (w,) = v["warnings"]
        assert left_uuid in w and f"xe vbd-destroy uuid={vbd}" in w and "WARNING" in p.stderr
        assert sim.vdi(left_uuid)["path"], "the held snapshot stays, with its data"
    finally:
        sim.stop()


def test_xapi_calls_per_disk_of_an_incremental_run_stay_few(tmp_path, repo):
    """An incremental run of a few VMs reads each VM's disks and their snapshots in two
    calls, and the snapshot VM's in two more, and takes one snapshot per VM: its XAPI
    calls per disk stay few (they were 18.5 when every step read the disk's record
    again, 12.7 with a record call per VBD and VDI), whatever the number of disks and
    --jobs. A disk with a few scattered changes is read over one NBD connection. The
    workers' own sessions are logged out."""
    vms = [{"name": f"vm{i}", "host": ["h1", "h2"][i % 2],
            "disks": [{"name": f"d{k}", "size": 2 * MIB} for k in range(2)]} for i in range(6)]
    sim = Sim(tmp_path, vms, hosts=["h1", "h2"])
    try:
        args = [a for vm in vms for a in ("--vm", vm["name"])] + ["--jobs", 4]
        ingest(sim, repo, *args)
        disks = [d for vm in vms for d in sim.disks_of(vm["name"])]
        for d in disks[::3]:
            for b in (1, 5, 9):     # three extents: four connections once
                sim.write(d["uuid"], b * BLOCK, b"changed")
        sim.post("/reset_counters", {})
        _, summary = ingest(sim, repo, *args)
        assert len(summary["vdis"]) == len(disks)
        assert all(v["ok"] and not v["full"] for v in summary["vdis"]), summary
        assert sum(v["blocks_read"] for v in summary["vdis"]) == 3 * len(disks[::3])
        assert sum(h["served"] for h in sim.get("/nbd_hosts")["hosts"]) == len(disks[::3])
        calls = sim.get("/calls")
        work = {m: n for m, n in calls.items() if not m.startswith("session.")}
        per_disk = sum(work.values()) / len(disks)
        assert per_disk <= 9, (per_disk, calls)
        assert "VDI.get_record" not in calls and "VBD.get_record" not in calls, calls
        assert calls["VM.get_all_records_where"] == len(vms), calls   # the --vm lookup, by name
        assert calls["VBD.get_all_records_where"] == 2 * len(vms), calls  # the VM's, the snapshot's
        assert calls["VDI.get_all_records_where"] == 2 * len(vms), calls
        assert calls["VM.snapshot"] == len(vms), calls
        assert 2 <= calls["session.login_with_password"] <= 4, calls  # one per worker
        assert calls["session.logout"] == calls["session.login_with_password"]
        assert sim.state()["sessions"] == 0
        assert not data_snapshots(sim)
        assert all(len([s for s in sim.snapshots_of(d["uuid"])]) == 1 for d in disks)
    finally:
        sim.stop()


def test_nbd_connections_follow_what_there_is_to_read(tmp_path, repo):
    """A connection costs the host a TLS handshake and a VBD plug: a disk gets one per
    32 MiB it has to read, up to --connections. A full read of 96 MiB takes three, one
    of 4 MiB a single one, and an incremental run with a few changes one per disk."""
    sim = Sim(tmp_path, [{"name": "vm", "disks": [{"name": "big", "size": 96 * MIB},
                                                  {"name": "small", "size": 4 * MIB}]}])
    try:
        big, small = sorted(sim.disks_of("vm"), key=lambda d: -d["virtual_size"])
        # Slow reads, so that every connection the transfer wants gets to open.
        sim.post("/nbd_faults", {"vdi": big["uuid"], "read_delay_ms": 30})
        _, summary = ingest(sim, repo, "--vm", "vm", "--jobs", 1, "--connections", 8, "--host-connections", 8)
        assert all(v["ok"] and v["full"] for v in summary["vdis"]), summary
        assert sum(h["served"] for h in sim.get("/nbd_hosts")["hosts"]) == 3 + 1
        for d in (big, small):
            sim.write(d["uuid"], 2 * MIB, b"changed")
        sim.post("/reset_counters", {})
        _, summary = ingest(sim, repo, "--vm", "vm", "--jobs", 1, "--connections", 8, "--host-connections", 8)
        assert all(v["ok"] and not v["full"] for v in summary["vdis"]), summary
        assert sum(h["served"] for h in sim.get("/nbd_hosts")["hosts"]) == 2
    finally:
        sim.stop()
