"""Health checks of staged models, behind one small interface.

:class:`HealthChecker` is the seam (like :class:`agent.update.fetcher.Fetcher` for
downloads): the update pipeline hands it a model file, the runtime settings
and the variant's health check, and gets a verdict. The real one,
:class:`SubprocessHealthChecker`, runs :mod:`agent.healthcheck` in a child
interpreter, time-bounded, so that llama.cpp's memory and native crashes
stay out of the agent process. The agent itself uses
:class:`agent.healthcheck.in_worker.WorkerHealthChecker`, which checks the model
in the inference worker that will then serve it (a warm swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import HealthCheck

from ..runtime_settings import EffectiveRuntime

log = logging.getLogger(__name__)

#: bytes of the child's stderr kept for a crash report
STDERR_TAIL = 2000


class HealthAborted(Exception):
    """The caller asked the check to stop (a newer assignment, or shutdown)."""


@dataclass(frozen=True, slots=True)
class HealthRequest:
    """What to check: a model file, how to run it, and the variant's rules."""

    model: Path
    format: str
    runtime: EffectiveRuntime
    spec: HealthCheck
    #: the store key and release identity of the model (labels the worker that loads it)
    key: str | None = None
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    #: a LoRA adapter's base: (name, the build's artifact sha256, scale); checked on
    #: that base's serving worker with the adapter applied
    adapter_of: tuple[str, str, float] | None = None

    def to_json(self) -> bytes:
        """The request as :mod:`agent.healthcheck` reads it on stdin."""
        return json.dumps({
            "model": str(self.model),
            "format": self.format,
            "runtime": self.runtime.as_dict(),
            "health_check": self.spec.model_dump(mode="json"),
        }).encode()


@dataclass(frozen=True, slots=True)
class HealthResult:
    """The verdict; ``reasons`` say why it failed (empty when it passed)."""

    passed: bool
    reasons: list[str]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """All reasons in one line, for events and ``hello``."""
        return "; ".join(self.reasons) or "passed"


class HealthChecker(ABC):
    """Checks a staged model before traffic may move to it."""

    @abstractmethod
    async def check(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        """Run the check; raise :class:`HealthAborted` soon after ``abort`` is set.

        A model that fails, crashes the runtime or runs out of time is a
        failed :class:`HealthResult`, never an exception.
        """


class SubprocessHealthChecker(HealthChecker):
    """Runs ``python -m agent.healthcheck`` (or ``argv``) with a time limit."""

    def __init__(self, timeout_s: float, argv: Sequence[str] | None = None) -> None:
        self.timeout_s = timeout_s
        self.argv = list(
            argv or [sys.executable, "-m", "agent.healthcheck", "--parent", str(os.getpid())]
        )

    async def check(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        """See :meth:`HealthChecker.check`."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        talk = asyncio.ensure_future(proc.communicate(request.to_json()))
        stop = asyncio.ensure_future(abort.wait())
        try:
            done, _ = await asyncio.wait(
                {talk, stop}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if talk not in done:
                if stop in done:
                    raise HealthAborted("health check aborted")
                return HealthResult(False, [f"health check timed out after {self.timeout_s:g} s"])
            stdout, stderr = talk.result()
        finally:
            stop.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                # Reap it, so no zombie outlives the check.
                with contextlib.suppress(Exception):
                    await asyncio.shield(talk)
        return _parse(proc.returncode, stdout, stderr)


def _parse(returncode: int | None, stdout: bytes, stderr: bytes) -> HealthResult:
    tail = stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
    if returncode != 0:
        # A native crash (negative: the signal) or an OOM kill lands here.
        log.warning("health check exited %s: %s", returncode, tail)
        last = tail.splitlines()[-1] if tail else ""
        return HealthResult(False, [f"health check crashed (exit {returncode}): {last[:300]}"])
    try:
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        passed, reasons = result["passed"], result["reasons"]
        if not isinstance(passed, bool) or not all(isinstance(r, str) for r in reasons):
            raise TypeError("bad field types")
    except (ValueError, LookupError, TypeError) as exc:
        return HealthResult(False, [f"health check gave no readable result: {exc}"])
    details = {k: v for k, v in result.items() if k not in ("passed", "reasons")}
    return HealthResult(passed, list(reasons), details)
