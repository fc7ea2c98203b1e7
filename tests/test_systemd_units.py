"""The systemd units, checked statically: ``systemd-analyze verify`` and
``security --offline=yes``, the hardening directives docs/systemd.md lists, and the
sysusers/tmpfiles snippets applied to a scratch root.

Running the units under a real systemd is tests/test_systemd_sandbox.py.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.units import (
    ACCELERATORS_DROPIN,
    AGENT_UNIT,
    CONTROLPLANE_UNIT,
    REPO,
    SYSUSERS_CONF,
    TMPFILES_CONF,
    UNITS,
    exposure,
    exposure_with_root,
    parse_unit,
    systemd_analyze,
    systemd_version,
)

#: the agent's exposure bound (docs/systemd.md); the control plane is held to it too
MAX_EXPOSURE = 2.5
DOCS = REPO / "docs" / "systemd.md"

#: Targets the units name or that default dependencies pull in; verify needs
#: them to exist, and stubs keep the host's own unit files out of the check.
_STUB_TARGETS = ("sysinit", "basic", "shutdown", "network", "network-online", "multi-user")


def _exec_path(unit: Path) -> str:
    return parse_unit(unit.read_text())["Service"]["ExecStart"][0].split()[0]


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A root tree holding the units, stub targets and an executable at ExecStart.

    ``systemd-analyze verify`` insists that ExecStart's binary exists; with
    ``--root`` it looks for it inside this tree, so the unit files are checked
    exactly as shipped, without /opt/slmfleet on the test machine.
    """
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        (units / unit.name).write_text(unit.read_text())
        binary = tmp_path / _exec_path(unit).lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    for target in _STUB_TARGETS:
        (units / f"{target}.target").write_text(f"[Unit]\nDescription={target} stub\n")
    return tmp_path


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_passes(verify_root: Path, unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", f"--root={verify_root}",
         str(verify_root / "etc/systemd/system" / unit.name)],
        capture_output=True, text=True, check=False,
    )
    # verify exits 0 on unknown keys and unparsable values, printing only a
    # warning, so any line it prints about our unit is a failure too.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "slmfleet" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_verify_root_catches_a_broken_unit(verify_root: Path) -> None:
    """The check above would notice a mistake: a typo and a missing binary."""
    unit = verify_root / "etc/systemd/system" / AGENT_UNIT.name
    unit.write_text(unit.read_text().replace("MemoryMax=", "MemoryMaxx=", 1))
    (verify_root / _exec_path(AGENT_UNIT).lstrip("/")).unlink()
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", f"--root={verify_root}",
                             str(unit)], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Unknown key 'MemoryMaxx'" in output
    assert "is not executable" in output


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_security_exposure_at_most_2_5(unit: Path) -> None:
    score = exposure(unit)
    print(f"{unit.name}: exposure {score} (systemd {systemd_version()}, --offline=yes)")
    assert score <= MAX_EXPOSURE


def test_docs_report_the_measured_exposure() -> None:
    """docs/systemd.md quotes the figures; they must match what systemd measures.

    The weights change between systemd releases, so the figures are compared
    only on the release the docs name.
    """
    text = DOCS.read_text()
    documented_version = re.search(r"measured with systemd (\d+)", text)
    assert documented_version, "docs/systemd.md must say which systemd measured the scores"
    if int(documented_version.group(1)) != systemd_version():
        pytest.skip(f"docs were measured with systemd {documented_version.group(1)}, "
                    f"this is {systemd_version()}")
    for unit in UNITS:
        row = re.search(rf"\|\s*`{re.escape(unit.name)}`\s*\|\s*(\d+\.\d)\s*\|", text)
        assert row, f"no exposure row for {unit.name} in docs/systemd.md"
        assert float(row.group(1)) == exposure(unit), unit.name


def test_agent_unit_has_the_directives_issue_6_names() -> None:
    service = parse_unit(AGENT_UNIT.read_text())["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key}= missing"
        assert len(service[key]) == 1, f"{key}= set more than once: {service[key]}"
        return service[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "60s"
    assert one("Restart") == "on-failure"
    assert one("User") == one("Group") == "slmfleet-agent"
    assert one("StateDirectory") == "slmfleet/agent"
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert one("AmbientCapabilities") == ""
    assert one("SystemCallArchitectures") == "native"
    assert service["SystemCallFilter"][0] == "@system-service"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one("MemoryMax")
    # The inference worker is a child: its OOM kill must not stop the agent.
    assert one("OOMPolicy") == "continue"
    for flag in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                 "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                 "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                 "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                 "LockPersonality", "MemoryDenyWriteExecute"):
        assert one(flag) == "yes", flag
    assert one("ProtectProc") == "invisible"
    assert one("UMask") == "0077"
    # ProcSubset=pid hides /proc/meminfo, /proc/cpuinfo and /proc/stat, which
    # the probe and the telemetry read (tests/test_systemd_sandbox.py shows it).
    assert "ProcSubset" not in service


def test_controlplane_unit_runs_as_its_own_sandboxed_user() -> None:
    service = parse_unit(CONTROLPLANE_UNIT.read_text())["Service"]
    assert service["Type"] == ["exec"]
    assert service["User"] == service["Group"] == ["slmfleet-controlplane"]
    assert service["StateDirectory"] == ["slmfleet/controlplane"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert service["Restart"] == ["on-failure"]
    assert service["MemoryMax"]


def test_units_use_the_paths_the_code_defaults_to() -> None:
    """Config and state paths in the units are the ones the code reads by default."""
    from agent.config import DEFAULT_CONFIG_PATH, AgentConfig
    from controlplane.config import DEFAULT_DATA_DIR

    agent = parse_unit(AGENT_UNIT.read_text())["Service"]
    assert f"--config {DEFAULT_CONFIG_PATH}" in agent["ExecStart"][0]
    default_state = AgentConfig.model_fields["state_dir"].default
    assert Path("/var/lib") / agent["StateDirectory"][0] == default_state
    cp = parse_unit(CONTROLPLANE_UNIT.read_text())["Service"]
    assert Path("/var/lib") / cp["StateDirectory"][0] == DEFAULT_DATA_DIR


@pytest.mark.skipif(os.geteuid() != 0, reason="creating files owned by service users needs root")
def test_sysusers_and_tmpfiles_create_users_and_private_state_dirs(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS_CONF)],
                   check=True, capture_output=True)
    passwd = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc/passwd").read_text().splitlines()}
    for user, home in (("slmfleet-agent", "/var/lib/slmfleet/agent"),
                       ("slmfleet-controlplane", "/var/lib/slmfleet/controlplane")):
        assert int(passwd[user][2]) < 1000, "a system user"
        assert passwd[user][5] == home
        assert passwd[user][6].endswith("nologin")

    (tmp_path / "etc/slmfleet").mkdir()
    (tmp_path / "etc/slmfleet/agent.toml").write_text("device_id = 'x'\n")
    (tmp_path / "etc/slmfleet/agent.toml").chmod(0o644)
    result = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                             str(TMPFILES_CONF)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr

    state = tmp_path / "var/lib/slmfleet/agent"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert state.stat().st_uid == int(passwd["slmfleet-agent"][2])
    cp_state = tmp_path / "var/lib/slmfleet/controlplane"
    assert cp_state.stat().st_uid == int(passwd["slmfleet-controlplane"][2])
    config = (tmp_path / "etc/slmfleet/agent.toml").stat()
    assert stat.S_IMODE(config.st_mode) == 0o640, "the MQTT password is not world-readable"
    assert config.st_gid == int(passwd["slmfleet-agent"][3])
    # Absent secret files are skipped, not created.
    assert not (tmp_path / "etc/slmfleet/mqtt-password").exists()


def test_accelerator_dropin_verifies_and_keeps_the_exposure_low(verify_root: Path) -> None:
    """The opt-in GPU/NPU drop-in, applied to the agent unit as an admin would."""
    dropins = verify_root / "etc/systemd/system" / f"{AGENT_UNIT.name}.d"
    dropins.mkdir()
    (dropins / "accelerators.conf").write_text(ACCELERATORS_DROPIN.read_text())
    unit = verify_root / "etc/systemd/system" / AGENT_UNIT.name
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", f"--root={verify_root}",
                             str(unit)], capture_output=True, text=True, check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "slmfleet" in line or "accelerators" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr

    merged = parse_unit(unit.read_text() + ACCELERATORS_DROPIN.read_text())["Service"]
    assert merged["PrivateDevices"][-1] == "no"
    assert merged["DevicePolicy"] == ["closed"], "only the listed devices"
    score = exposure_with_root(verify_root, AGENT_UNIT.name)
    print(f"{AGENT_UNIT.name} + accelerators.conf: exposure {score}")
    assert score <= MAX_EXPOSURE
