"""Detect this device once at start: capabilities, runtimes, firmware profile.

Detection runs in a short-lived child interpreter (``python -m
agent.hardware``) that prints one JSON line, as the runtime probe already
does for package metadata and onnxruntime. What detection needs and the
idling agent does not (psutil, PyYAML, the probe code, the parsed profile
files) then never occupies the agent's memory, which stays resident for
months on devices with a few hundred MB of RAM. The child costs a fraction
of a second once per start.

If the child cannot be run or dies without an answer, detection runs in the
agent process instead: a device that starts with a larger footprint is
worth more than one that does not start. A profile or preset error is
reported by the child as such and raised as ``ValueError``, exactly as
in-process detection would.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import Capabilities, Runtime

from . import LOG_FORMAT
from .profiles import FirmwareProfile

if TYPE_CHECKING:
    from .config import AgentConfig

log = logging.getLogger(__name__)

Hardware = tuple[Capabilities, list[Runtime], FirmwareProfile]

#: The probe's own limits (nvidia-smi 5 s, the onnxruntime child 20 s) plus
#: a slow interpreter start from an SD card; with the in-process retry after
#: it, start-up stays inside the unit's TimeoutStartSec (2 min).
DETECT_TIMEOUT_S = 45.0


def detect_here(models_path: Path, profiles_dir: Path | None, preset: str | None) -> Hardware:
    """Probe (or, for a simulated ``preset``, recall) this device and match its profile.

    Runs in whichever process calls it; the agent calls it through
    :func:`detect_hardware`. Raises ``ValueError`` for an unknown preset or a
    missing or malformed profile directory.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .probe import probe_capabilities, probe_runtimes
    from .profiles import default_profiles_dir, load_profiles, match_profile
    from .simulated import simulated_capabilities

    # The runtime probe waits most of its time on its own child importing
    # onnxruntime; the rest of detection runs meanwhile.
    with ThreadPoolExecutor(max_workers=1) as pool:
        runtimes = pool.submit(probe_runtimes)
        if preset is not None:
            caps = simulated_capabilities(preset)
        else:
            caps = probe_capabilities(models_path)
        profiles = load_profiles(profiles_dir or default_profiles_dir())
        return caps, runtimes.result(), match_profile(caps, profiles)


def _request(config: AgentConfig) -> dict[str, Any]:
    return {
        "models_path": str(config.models_path),
        "profiles_dir": str(config.profiles_dir) if config.profiles_dir else None,
        "preset": _preset(config),
        "log_level": config.log_level,
    }


def _preset(config: AgentConfig) -> str | None:
    return config.simulate.preset if config.simulate is not None else None


class Detection:
    """Hardware detection under way in a child interpreter, started on construction.

    Start it early and ask for :meth:`result` when the answer is needed: the
    agent loads its own modules while the child probes.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        timeout_s: float = DETECT_TIMEOUT_S,
        argv: Sequence[str] | None = None,
    ) -> None:
        """Start the child; ``argv`` replaces its command line (tests)."""
        self._config = config
        self._deadline = time.monotonic() + timeout_s
        config.models_path.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[str] | None
        try:
            # stderr is inherited: the child's probe warnings land in the agent's log.
            self._proc = subprocess.Popen(
                [*(argv or [sys.executable, "-m", "agent.hardware"]),
                 json.dumps(_request(config))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            log.warning("hardware probe child not started (%s); probing in the agent process",
                        exc)
            self._proc = None

    def result(self) -> Hardware:
        """The child's answer, or in-process detection when it gave none.

        Raises ``ValueError`` for an unknown preset or a bad profile directory.
        """
        hardware = self._answer()
        if hardware is None:
            config = self._config
            hardware = detect_here(config.models_path, config.profiles_dir, _preset(config))
        return hardware

    def _answer(self) -> Hardware | None:
        if self._proc is None:
            return None
        try:
            out, _ = self._proc.communicate(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            log.warning("hardware probe child timed out; probing in the agent process")
            return None
        try:
            answer = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            answer = None
        if not isinstance(answer, dict):
            log.warning("hardware probe child exited %d without an answer; probing in the agent "
                        "process", self._proc.returncode)
            return None
        if "error" in answer:
            raise ValueError(str(answer["error"]))
        try:
            return (
                Capabilities.model_validate(answer["capabilities"]),
                [Runtime.model_validate(r) for r in answer["runtimes"]],
                FirmwareProfile.model_validate(answer["profile"]),
            )
        except (KeyError, TypeError, ValueError) as exc:  # ValidationError is a ValueError
            log.warning("hardware probe child answered nonsense (%s); probing in the agent "
                        "process", exc)
            return None


def detect_hardware(config: AgentConfig, *, timeout_s: float = DETECT_TIMEOUT_S) -> Hardware:
    """Measure (or, under a simulated-hardware override, recall) this device."""
    return Detection(config, timeout_s=timeout_s).result()


def main(argv: list[str]) -> int:
    """Child entry point: detect per the JSON request in ``argv[0]``, print one JSON line."""
    request = json.loads(argv[0])
    logging.basicConfig(level=request["log_level"], format=LOG_FORMAT)
    profiles_dir = request["profiles_dir"]
    try:
        caps, runtimes, profile = detect_here(
            Path(request["models_path"]),
            Path(profiles_dir) if profiles_dir else None,
            request["preset"],
        )
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    # Only the fields each model was given: validated again in the agent, they
    # come back with the same ``model_fields_set``, which matters (a profile
    # overrides a variant's runtime defaults only where it states a value).
    print(json.dumps({
        "capabilities": caps.model_dump(mode="json", exclude_unset=True),
        "runtimes": [r.model_dump(mode="json", exclude_unset=True) for r in runtimes],
        "profile": profile.model_dump(mode="json", exclude_unset=True),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
