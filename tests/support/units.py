"""The project's systemd units as files, and ``systemd-analyze`` run on them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
AGENT_UNIT = SYSTEMD_DIR / "slmfleet-agent.service"
CONTROLPLANE_UNIT = SYSTEMD_DIR / "slmfleet-controlplane.service"
UNITS = (AGENT_UNIT, CONTROLPLANE_UNIT)
#: the opt-in GPU/NPU drop-in for the agent
ACCELERATORS_DROPIN = SYSTEMD_DIR / "slmfleet-agent.service.d" / "accelerators.conf.example"
SYSUSERS_CONF = SYSTEMD_DIR / "sysusers.d" / "slmfleet.conf"
TMPFILES_CONF = SYSTEMD_DIR / "tmpfiles.d" / "slmfleet.conf"

_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

Directives = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Directives:
    """Section -> key -> every value assigned, in order (keys may repeat).

    Kept literal: an empty assignment (``CapabilityBoundingSet=``) is the
    value ``""``, so a test can tell "emptied" from "absent".
    """
    sections: Directives = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"not a unit-file line: {raw!r}")
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_analyze() -> str:
    """Path of ``systemd-analyze``; fails the test with the fix when missing."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: run scripts/bootstrap.sh "
                    "(it installs the Debian package systemd)", pytrace=False)
    return path


def systemd_version() -> int:
    """Major version of the installed systemd (``systemd 252 (...)`` -> 252)."""
    out = subprocess.run([systemd_analyze(), "--version"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[1])


def exposure(unit: Path) -> float:
    """Overall exposure that ``systemd-analyze security --offline=yes`` gives ``unit``."""
    return _security([str(unit)])


def exposure_with_root(root: Path, unit_name: str) -> float:
    """Exposure of ``unit_name`` as installed under ``root``, drop-ins included."""
    return _security([f"--root={root}", unit_name])


def _security(args: list[str]) -> float:
    # Parsed from the text report: systemd 252's --json lists the individual
    # checks but not the overall figure.
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", *args],
                            capture_output=True, text=True, check=False)
    match = _EXPOSURE.search(result.stdout)
    assert match, f"no overall exposure in:\n{result.stdout}{result.stderr}"
    return float(match.group(1))
