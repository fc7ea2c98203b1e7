"""``slmfleet controlplane serve`` as a child process, for tests that kill it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from tests.support.auth import ADMIN_TOKEN


def write_config(path: Path, **settings: Any) -> Path:
    """A control-plane TOML config at ``path`` (paths and path lists as strings)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    path.write_text(tomli_w.dumps({k: plain(v) for k, v in settings.items() if v is not None}))
    return path


class ServeProcess:
    """``slmfleet controlplane serve --config PATH`` as a child process."""

    def __init__(self, config: Path) -> None:
        self.log_path = config.with_name(f"serve-{secrets.token_hex(2)}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slmfleet", "controlplane", "serve",
             "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "SLMFLEET_TOKEN": ADMIN_TOKEN},
        )
        self.api_url = self._wait_for_api()

    def _wait_for_api(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("API http://"):
                    return line.split()[1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no API line from the control plane:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: nothing is flushed, no lease released, no job store closed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
