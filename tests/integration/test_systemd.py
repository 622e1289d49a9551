"""The systemd units shipped in systemd/: systemd-analyze verify accepts them
(an instance of the service and of its timer, with ExecStart pointing at the
cbtfs-ingest just built), meson installs them into systemd's unit directory,
and the service keeps its sandbox and takes the password as a credential."""

import json
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(HERE, "..", "..", "systemd")
BUILD = os.path.abspath(os.environ.get("CBTFS_BUILD", os.path.join(HERE, "..", "..", "build")))
INGEST = os.path.join(BUILD, "src", "cbtfs-ingest")


def unit_settings(text):
    """{key: [values]} of a unit file, comments left out."""
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_verify_install_and_keep_their_sandbox(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    service = open(os.path.join(UNITS, "cbtfs-ingest@.service.in")).read().replace("@BINDIR@", os.path.dirname(INGEST))
    (tmp_path / "cbtfs-ingest@.service").write_text(service)
    shutil.copy(os.path.join(UNITS, "cbtfs-ingest@.timer"), tmp_path)
    # --man=no: the man page named in Documentation= is not installed here
    # (scripts/package-smoke.sh verifies the installed units with it).
    p = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "cbtfs-ingest@site1.service"),
                        str(tmp_path / "cbtfs-ingest@site1.timer")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr

    # A unit with a mistake in it does not pass: the check above can fail.
    (tmp_path / "cbtfs-ingest@.service").write_text(service.replace("ProtectSystem=strict", "ProtectSystem=strickt"))
    p = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "cbtfs-ingest@site1.service")],
                       capture_output=True, text=True, timeout=120)
    assert "strickt" in p.stdout + p.stderr

    s = unit_settings(service)
    for key, value in [("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
                       ("EnvironmentFile", "/etc/cbtfs/ingest/%i.conf"),
                       ("LoadCredential", "xapi-password:/etc/cbtfs/ingest/%i.password")]:
        assert s[key] == [value], key
    assert "-/srv/cbtfs" in s["ReadWritePaths"][0].split()
    exec_start = s["ExecStart"][0].split()
    assert exec_start[0] == INGEST and "%d/xapi-password" in exec_start
    assert "${CBTFS_REPO}" == exec_start[-1]
    # The options the configuration may carry are cbtfs-ingest's.
    usage = subprocess.run([INGEST, "--help"], capture_output=True, text=True).stdout
    for option in ("--all", "--tag", "--exclude-tag", "--metrics-file", "--host-connections"):
        assert option in usage
    timer = unit_settings(open(os.path.join(UNITS, "cbtfs-ingest@.timer")).read())
    assert timer["Persistent"] == ["true"] and timer["WantedBy"] == ["timers.target"]

    installed = json.loads(subprocess.run(["meson", "introspect", "--installed", BUILD], capture_output=True,
                                          text=True, check=True).stdout)
    names = {os.path.basename(dst): dst for dst in installed.values()}
    unitdir = subprocess.run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"], capture_output=True,
                             text=True).stdout.strip() or "/lib/systemd/system"
    assert names.get("cbtfs-ingest@.service") == f"{unitdir}/cbtfs-ingest@.service"
    assert names.get("cbtfs-ingest@.timer") == f"{unitdir}/cbtfs-ingest@.timer"
