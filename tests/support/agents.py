"""Run real agent processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w


def write_agent_config(directory: Path, device_id: str, broker_url: str, password: str,
                       **extra: Any) -> Path:
    """Write an agent TOML config under ``directory`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "device_id": device_id,
        "broker_url": broker_url,
        "password": password,
        "state_dir": str(directory / "state"),
        "heartbeat_interval_s": 0.5,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "log_level": "DEBUG",
        # A free port each: tests run several agents at once on one machine.
        "api_port": 0,
    }
    config.update(extra)
    path = directory / "agent.toml"
    path.write_text(tomli_w.dumps(config))
    return path


class AgentProcess:
    """``slmfleet agent run`` as a child process, output kept in a log file."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = config_path.with_name("agent.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slmfleet", "agent", "run",
                 "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no chance to say goodbye, so only the Last Will speaks."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM and wait for a clean exit; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def terminate_group(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> int:
        """``sig`` to the agent and every child at once, as systemd's default
        KillMode=control-group and Ctrl-C in a terminal do; return the exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
