"""Hardware detection in a child interpreter: same answer as in-process, errors kept,
fallback when the child fails, and the idling agent never holds the probe's modules."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.config import AgentConfig
from agent.hardware import Detection, detect_hardware, detect_here

REPO = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO / "firmware-profiles"


def _config(tmp_path: Path, **extra: object) -> AgentConfig:
    return AgentConfig.model_validate(
        {"device_id": "hw-dev", "state_dir": str(tmp_path / "state"),
         "profiles_dir": str(PROFILES_DIR), **extra}
    )


def _fields_set(model: BaseModel) -> dict[str, object]:
    """Which fields were given, nested models included (``==`` ignores that)."""
    return {
        name: _fields_set(value) if isinstance(value, BaseModel) else None
        for name in sorted(model.model_fields_set)
        if (value := getattr(model, name)) is not None
    }


@pytest.mark.parametrize("preset", ["raspberry-pi-4-4gb", "x86_64-gpu-workstation"])
def test_child_answers_as_in_process_detection(tmp_path: Path, preset: str) -> None:
    config = _config(tmp_path, simulate={"preset": preset})
    caps, runtimes, profile = detect_hardware(config)
    here_caps, here_runtimes, here_profile = detect_here(config.models_path, PROFILES_DIR, preset)
    assert (caps, runtimes, profile) == (here_caps, here_runtimes, here_profile)
    # A profile overrides a variant's runtime defaults only where it states a
    # value (agent.runtime_settings), so what was stated must survive the trip.
    assert _fields_set(profile) == _fields_set(here_profile)
    assert _fields_set(caps) == _fields_set(here_caps)
    assert [_fields_set(r) for r in runtimes] == [_fields_set(r) for r in here_runtimes]


def test_generic_profile_states_no_runtime_setting(tmp_path: Path) -> None:
    empty = tmp_path / "no-profiles"
    empty.mkdir()
    profile = detect_hardware(_config(tmp_path, profiles_dir=str(empty)))[2]
    assert profile.id == "generic"
    assert profile.runtime.model_fields_set == set()


def test_real_probe_through_the_child(tmp_path: Path) -> None:
    config = _config(tmp_path)
    caps, runtimes, profile = detect_hardware(config)
    here_caps, here_runtimes, here_profile = detect_here(config.models_path, PROFILES_DIR, None)
    # free disk moves between two probes; everything else is the same device
    assert caps.model_copy(update={"disk_free_bytes": 0}) == here_caps.model_copy(
        update={"disk_free_bytes": 0}
    )
    assert runtimes == here_runtimes
    assert profile == here_profile
    assert config.models_path.is_dir()


def test_profile_errors_are_raised_as_before(tmp_path: Path) -> None:
    bad = tmp_path / "profiles"
    bad.mkdir()
    (bad / "broken.yaml").write_text("id: broken\ntier: [not, a, tier]\n")
    with pytest.raises(ValueError, match=r"broken\.yaml"):
        detect_hardware(_config(tmp_path, profiles_dir=str(bad)))
    with pytest.raises(ValueError, match="does not exist"):
        detect_hardware(_config(tmp_path, profiles_dir=str(tmp_path / "missing")))


def test_unknown_preset_is_raised(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown simulated hardware preset"):
        detect_hardware(_config(tmp_path, simulate={"preset": "no-such-board"}))


@pytest.mark.parametrize(
    "argv",
    [["/nonexistent/python"], ["/bin/false"], ["/bin/sh", "-c", """echo '{"runtimes": 1}'"""]],
)
def test_failed_child_falls_back_to_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, argv: list[str]
) -> None:
    """Not started, no answer, or a malformed one: the device still starts."""
    config = _config(tmp_path, simulate={"preset": "x86_64-gpu-workstation"})
    expected = detect_here(config.models_path, PROFILES_DIR, "x86_64-gpu-workstation")
    with caplog.at_level(logging.WARNING, logger="agent.hardware"):
        assert Detection(config, argv=argv).result() == expected
    assert "probing in the agent process" in caplog.text


def test_hung_child_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = tmp_path / "hung-probe"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    config = _config(tmp_path, simulate={"preset": "raspberry-pi-4-4gb"})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agent.hardware"):
        profile = Detection(config, timeout_s=0.5, argv=[str(script)]).result()[2]
    assert profile.id == "raspberry-pi-4-4gb"
    assert "timed out" in caplog.text
    assert time.monotonic() - started < 25


def test_idling_agent_holds_no_probe_modules(tmp_path: Path) -> None:
    """What only detection needs stays in the child: PyYAML, psutil, the probe code."""
    check = (
        "import sys\n"
        "from pathlib import Path\n"
        "import agent.cli, agent.service\n"
        "from agent.config import AgentConfig\n"
        "from agent.hardware import detect_hardware\n"
        f"config = AgentConfig(device_id='hw-dev', state_dir=Path({str(tmp_path)!r}))\n"
        "detect_hardware(config)\n"
        "loaded = {'yaml', 'psutil', 'agent.probe', 'argparse', 'typer'} & set(sys.modules)\n"
        "sys.exit(f'imported {sorted(loaded)}' if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
