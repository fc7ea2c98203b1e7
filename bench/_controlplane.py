"""One control plane in a process of its own, for benchmarks that account CPU per role.

    python bench/_controlplane.py --role controlplane '<settings JSON>'

The settings JSON holds ``data_dir``, ``mqtt_url``, ``username``, ``password``
and any :class:`ControlPlaneSettings` field besides. Once the API answers it
prints ``ready {"api_url": ..., "writer_pid": ...}``; then it answers
commands on stdin, one per line:

- ``threads``: one JSON line, CPU seconds so far per thread group
  (:func:`bench._roles.thread_group`: ingest receive, API, scheduler jobs,
  leader lease, publisher), read from each live thread's CPU clock;
- ``stop`` (or end of input): stop the control plane and exit.

:class:`ControlPlaneProcess` is the benchmark's handle on it; its
``profile`` samples it (and its writer) with py-spy over a window.

``--role`` is how :mod:`bench._roles` recognises the process (and its
ingest writer, a child of it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _roles import ROLE_FLAG, thread_group  # noqa: E402

from controlplane.service import ControlPlane  # noqa: E402
from tests.support.controlplane import cp_settings  # noqa: E402


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread group of this process, from each live thread's clock."""
    spent: dict[str, float] = defaultdict(float)
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            spent[thread_group(thread.name)] += time.clock_gettime(clock)
        except OSError:  # ended between enumerate() and the read
            continue
    return dict(spent)


#: py-spy samples a second
PROFILE_RATE = 200


class ControlPlaneProcess:
    """A handle on this script run as a child of the benchmark."""

    def __init__(self, role: str, settings: dict[str, object]) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), ROLE_FLAG, role,
                   json.dumps(settings, default=str)]
        self.role = role
        self.proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"control plane {role!r} exited during start-up")
            if line.startswith("ready "):
                break
        ready = json.loads(line.removeprefix("ready "))
        self.api_url: str = ready["api_url"]
        self.writer_pid: int | None = ready["writer_pid"]

    def threads(self) -> dict[str, float]:
        """CPU seconds so far per thread group (see :func:`thread_cpu`)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("threads\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"control plane {self.role!r} exited (code "
                                   f"{self.proc.wait()})")
            if line.startswith("{"):  # anything else is a library printing to stdout
                return json.loads(line)

    def profile(self, seconds: float, out: Path) -> subprocess.Popen[bytes]:
        """Sample this control plane and its writer with py-spy for ``seconds`` into ``out``.

        Collapsed stacks (``--format raw``) of running threads only, 200 a
        second, without pausing the process (``--nonblocking``).
        """
        spy = Path(sys.executable).with_name("py-spy")
        return subprocess.Popen(
            [str(spy), "record", "--pid", str(self.proc.pid), "--subprocesses", "--nonblocking",
             "--rate", str(PROFILE_RATE), "--duration", str(int(seconds)), "--format", "raw",
             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the control plane (and write its profile, if profiled)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str]) -> None:
    """Start the control plane named by ``argv`` and serve the commands above."""
    if len(argv) != 3 or argv[0] != ROLE_FLAG:
        raise SystemExit(__doc__)
    values = json.loads(argv[2])
    broker = SimpleNamespace(url=values.pop("mqtt_url"))
    credentials = (values.pop("username"), values.pop("password"))
    data_dir = Path(values.pop("data_dir"))
    cp = ControlPlane(cp_settings(data_dir, broker, credentials, **values)).start()
    assert cp.ingest is not None
    print("ready " + json.dumps({"api_url": cp.api_url, "writer_pid": cp.ingest.writer_pid}),
          flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "threads":
                print(json.dumps(thread_cpu()), flush=True)
            elif command == "stop":
                break
    finally:
        cp.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
