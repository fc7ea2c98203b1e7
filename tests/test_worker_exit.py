"""How a dead inference worker is described: what the admin reads in the
device's health_failed event, the agent's log and the local API's 503."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from agent.inference.supervisor import WorkerExited, describe_exit


def died_of(sig: signal.Signals) -> int:
    """The return code of a real process that ``sig`` killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(sig)
    return proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("returncode", "oom", "expected"),
    [
        (1, False, "exited (1)"),
        (None, False, "exited (None)"),
        (-signal.SIGKILL, True, "killed by the OOM killer"),
        (-signal.SIGKILL, False, "killed by SIGKILL"),
        (-signal.SIGSEGV, False, "killed by SIGSEGV"),
        (-200, False, "killed by signal 200"),
    ],
)
def test_describe_exit(returncode: int | None, oom: bool, expected: str) -> None:
    assert describe_exit(returncode, oom) == expected


def test_an_illegal_instruction_names_the_cpu_and_the_fix() -> None:
    """SIGILL: a runtime built for CPU features the device lacks (AMX behind a hypervisor)."""
    exc = WorkerExited(died_of(signal.SIGILL), oom=False, detail="")
    assert str(exc).startswith("inference worker killed by SIGILL (")
    assert "CPU instruction this device cannot run" in str(exc)
    assert "build it for this CPU" in str(exc)


def test_the_last_stderr_line_follows() -> None:
    exc = WorkerExited(died_of(signal.SIGBUS), oom=False, detail="mmap failed")
    assert str(exc) == ("inference worker killed by SIGBUS (the model file changed or shrank "
                        "while mapped): mmap failed")
