"""The agent's handle on one worker subprocess (see :mod:`agent.inference.worker`).

Spawns it, loads the model, sends requests and routes the replies back by
id, and notices when it dies. Whether the death was an OOM kill is read
from the kernel's ``oom_kill`` counter (``/proc/vmstat``): a SIGKILL while
that counter went up is counted as an OOM, any other unexpected exit as a
crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .spec import ModelSpec

log = logging.getLogger(__name__)

#: longest reply line read from a worker (an embeddings batch, a generic ONNX output)
MAX_REPLY_BYTES = 64 << 20
#: bytes of a dead worker's stderr kept for the log
STDERR_TAIL = 4000


#: what a signal that kills a worker says about the device, for the admin who
#: reads the event or the log
SIGNAL_HINTS = {
    signal.SIGILL: "the inference runtime uses a CPU instruction this device cannot run: "
                   "build it for this CPU",
    signal.SIGBUS: "the model file changed or shrank while mapped",
}


def describe_exit(returncode: int | None, oom: bool) -> str:
    """How a worker ended, in words: the OOM killer, a named signal, or an exit status."""
    if oom:
        return "killed by the OOM killer"
    if returncode is None or returncode >= 0:
        return f"exited ({returncode})"
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"killed by signal {-returncode}"
    hint = SIGNAL_HINTS.get(sig)
    return f"killed by {sig.name}" + (f" ({hint})" if hint else "")


class WorkerExited(Exception):
    """The worker died; ``oom`` when the kernel's OOM killer took it."""

    def __init__(self, returncode: int | None, oom: bool, detail: str = "") -> None:
        kind = describe_exit(returncode, oom)
        super().__init__(f"inference worker {kind}{': ' + detail if detail else ''}")
        self.returncode = returncode
        self.oom = oom


class WorkerLoadError(Exception):
    """The model did not load (bad file, out of memory while loading, timeout)."""


class RemoteError(Exception):
    """The worker refused or failed one request; the worker itself is fine."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def oom_kills() -> int | None:
    """The kernel's count of OOM kills so far, where it exposes one."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def default_argv() -> list[str]:
    """``python -m agent.inference.worker --parent <agent pid>``."""
    return [sys.executable, "-m", "agent.inference.worker", "--parent", str(os.getpid())]


class Worker:
    """One worker process serving one :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec, argv: Sequence[str] | None = None) -> None:
        self.spec = spec
        self._argv = list(argv or default_argv())
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr: bytearray = bytearray()
        self._oom_before: int | None = None
        self.exited: asyncio.Future[WorkerExited] | None = None
        self.stopping = False
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before it started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Started and not (known to be) dead."""
        return self.exited is not None and not self.exited.done()

    async def start(self, timeout_s: float,
                    on_spawn: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Spawn the worker and load the model; return its ``ready`` frame.

        ``on_spawn`` gets the pid before the model loads (to share the cores).
        """
        loop = asyncio.get_running_loop()
        self._oom_before = oom_kills()
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=MAX_REPLY_BYTES,
        )
        if on_spawn is not None:
            on_spawn(self._proc.pid)
        self.exited = loop.create_future()
        self._ready = loop.create_future()
        self._reader = asyncio.create_task(self._read(), name=f"worker-{self._proc.pid}")
        self._stderr_task = asyncio.create_task(self._drain_stderr(),
                                                name=f"worker-{self._proc.pid}-stderr")
        self._write(self.spec.load_frame())
        waiting = {self._ready, self.exited}
        done, _ = await asyncio.wait(waiting, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._ready in done:
            ready = self._ready.result()
            if ready.get("op") == "ready":
                self.info = ready.get("info", {})
                return ready
            await self.stop()
            raise WorkerLoadError(ready.get("error", "model does not load"))
        if self.exited in done:
            raise WorkerLoadError(f"model does not load: {self.exited.result()}")
        await self.stop()
        raise WorkerLoadError(f"model did not load within {timeout_s:g} s")

    def _write(self, frame: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(frame, separators=(",", ":")).encode() + b"\n")

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(65536):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL]

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while line := await stdout.readline():
                frame = json.loads(line)
                rid = frame.get("id")
                if rid is None:
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(frame)
                    continue
                queue = self._pending.get(rid)
                if queue is not None:
                    queue.put_nowait(frame)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.error("worker %s sent an unreadable reply: %s", self.pid, exc)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        returncode = await self._proc.wait()
        oom = False
        if returncode == -signal.SIGKILL and self._oom_before is not None:
            after = oom_kills()
            oom = after is not None and after > self._oom_before
        tail = bytes(self._stderr).decode(errors="replace").strip().splitlines()
        exc = WorkerExited(returncode, oom, tail[-1][:300] if tail else "")
        if not self.stopping:
            log.warning("worker %s for %s: %s", self.pid, self.spec.ref, exc)
        assert self.exited is not None
        if not self.exited.done():
            self.exited.set_result(exc)
        for queue in self._pending.values():
            queue.put_nowait(exc)

    async def call(
        self,
        op: str,
        payload: dict[str, Any],
        on_delta: Callable[[str], None] | None = None,
        on_id: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Send one request; deltas go to ``on_delta``; return its ``done`` frame.

        Raises :class:`RemoteError` when the worker refused it and
        :class:`WorkerExited` when the worker died meanwhile.
        """
        if self.exited is None:
            raise RuntimeError("worker not started")
        if self.exited.done():
            raise self.exited.result()
        rid = next(self._ids)
        queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._pending[rid] = queue
        if on_id is not None:
            on_id(rid)
        try:
            self._write({"op": op, "id": rid, **payload})
            while True:
                frame = await queue.get()
                if isinstance(frame, BaseException):
                    raise frame
                kind = frame["op"]
                if kind == "delta":
                    if on_delta is not None:
                        on_delta(frame["text"])
                elif kind == "done":
                    return frame
                else:
                    raise RemoteError(frame.get("status", 500), frame.get("code", "error"),
                                      frame.get("message", "worker error"))
        finally:
            del self._pending[rid]

    def cancel(self, rid: int) -> None:
        """Ask the worker to stop generating request ``rid`` (it then answers ``done``)."""
        if self.alive:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._write({"op": "cancel", "id": rid})

    def kill(self) -> None:
        """SIGKILL the worker (it is stuck, or the agent gives up on it)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Close its stdin (it exits when done), then kill it after ``grace_s``."""
        self.stopping = True
        if self._proc is None:
            return
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), grace_s)
        except TimeoutError:
            self.kill()
            await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
