"""One model version and the worker running it; the runtime's errors and knobs.

A :class:`Slot` starts its worker (counting the load and its time),
restarts it after a crash while it serves (pausing longer after each crash
in a row), unloads it when the runtime makes room for another model, and
stops it for good when its version is replaced or its model removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .gate import Gate
from .spec import AdapterSpec, ModelSpec
from .stats import VersionStats
from .supervisor import RemoteError, Worker, WorkerExited, WorkerLoadError

log = logging.getLogger(__name__)

#: longest pause before restarting a worker that keeps crashing
MAX_RESTART_DELAY_S = 30.0


class Overloaded(Exception):
    """The queue is full (or waiting took too long): answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoModel(Exception):
    """No model (or not the one asked for) is being served."""


class Unavailable(Exception):
    """The model is known but its worker cannot run now (it does not load)."""


@dataclass(frozen=True, slots=True)
class RuntimeLimits:
    """The knobs of the inference runtime (from the agent config and profile)."""

    max_queue: int = 8
    queue_timeout_s: float = 60.0
    load_timeout_s: float = 120.0
    crash_limit: int = 3
    crash_window_s: float = 300.0
    #: models whose workers stay loaded at once (0: no cap); candidates not counted
    max_loaded: int = 0
    #: how long a model stays loaded after its last request (None: until evicted)
    keep_alive_s: float | None = None
    #: RAM kept free for the OS when deciding whether one more model fits
    os_reserve_bytes: int = 0


def slots_of(spec: ModelSpec) -> int:
    """Requests ``spec``'s worker runs at once: llama.cpp generations decode together."""
    runtime = spec.runtime
    if spec.format == "gguf" and not runtime.embeddings:
        return max(runtime.parallel, 1)
    return 1


class Slot:
    """One model version and the worker running it."""

    def __init__(self, spec: ModelSpec, stats: VersionStats, limits: RuntimeLimits,
                 argv: Sequence[str] | None) -> None:
        self.spec, self.stats, self._limits, self._argv = spec, stats, limits, argv
        self.worker: Worker | None = None
        #: the requests running on the worker (up to its slots)
        self.gate = Gate(slots_of(spec))
        #: held while the worker (re)starts or unloads: one at a time, whoever asks
        self.starting = asyncio.Lock()
        stats.slots = self.gate.capacity
        self.retired = False
        #: restarted after a crash; only the serving slot is (a candidate just fails)
        self.supervised = False
        #: its worker was unloaded on purpose (or never loaded): loads on the next request
        self.parked = False
        self.load_error: str | None = None
        #: LoRA adapters served on this version, by adapter name (loaded again on restart)
        self.adapters: dict[str, AdapterSpec] = {}
        self.crash_times: deque[float] = deque(maxlen=64)
        self._crashes_in_a_row = 0
        self._not_before = 0.0
        self._watcher: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        """Its worker runs (the model is in memory)."""
        return self.worker is not None and self.worker.alive

    @property
    def unhealthy(self) -> str | None:
        """Why this model counts as unhealthy now, or None."""
        window = self._limits.crash_window_s
        recent = [t for t in self.crash_times if time.monotonic() - t <= window]
        if len(recent) >= self._limits.crash_limit:
            return f"{len(recent)} worker crashes in the last {window:g} s"
        if self.load_error is not None:
            return self.load_error
        return None

    async def start(self, on_spawn: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Start a worker and load the model; return its ``ready`` frame.

        The caller holds :attr:`starting`, or owns the slot (not yet serving).
        ``on_spawn`` gets the worker's pid as soon as it exists.
        """
        delay = self._not_before - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        worker = Worker(self.spec, self._argv)
        began = time.perf_counter()
        try:
            ready = await worker.start(self._limits.load_timeout_s, on_spawn)
        except WorkerLoadError as exc:
            self.load_error = str(exc)
            self._backoff()
            raise
        # Counted as the caller waits for it: process start and model load together.
        self.stats.loaded(time.perf_counter() - began)
        self.load_error = None
        self.parked = False
        for adapter in list(self.adapters.values()):
            # A restarted or reloaded worker serves the same adapters as before.
            try:
                await worker.call("adapter_load", adapter.load_payload())
            except (RemoteError, WorkerExited) as exc:  # the base serves on without it
                log.error("adapter %s does not load on %s: %s", adapter.ref, self.spec.ref, exc)
                self.adapters.pop(adapter.name, None)
        self.worker = worker
        log.info("worker %s serves %s (loaded in %s ms): %s", worker.pid, self.spec.ref,
                 ready.get("load_ms"), worker.info)
        self._watcher = asyncio.create_task(self._watch(worker), name=f"watch-{worker.pid}")
        return ready

    def _backoff(self) -> None:
        self._crashes_in_a_row += 1
        pause = min(0.25 * 2 ** (self._crashes_in_a_row - 1), MAX_RESTART_DELAY_S)
        self._not_before = time.monotonic() + pause

    async def _watch(self, worker: Worker) -> None:
        assert worker.exited is not None
        # Shielded: cancelling this watcher must not cancel the worker's own future.
        exc = await asyncio.shield(worker.exited)
        if worker.stopping or self.retired or not self.supervised:
            return
        self.stats.crash(exc.oom)
        self.crash_times.append(time.monotonic())
        self._backoff()
        if self.unhealthy:
            log.error("%s is unhealthy: %s", self.spec.ref, self.unhealthy)
        # Restart now rather than on the next request: the device should be ready.
        async with self.starting:
            if not self.retired and not self.parked and self.worker is worker:
                with contextlib.suppress(WorkerLoadError):
                    await self.start()

    async def ensure_running(self) -> Worker:
        """The live worker, started again if it died or was unloaded (the caller
        holds :attr:`starting`)."""
        if self.worker is None or not self.worker.alive:
            try:
                await self.start()
            except WorkerLoadError as exc:
                raise Unavailable(f"{self.spec.ref} cannot run: {exc}") from exc
        assert self.worker is not None
        return self.worker

    def ran_ok(self) -> None:
        """A request succeeded: the crash streak is over."""
        self._crashes_in_a_row = 0

    async def unload(self, reason: str) -> None:
        """Stop the worker but keep serving: the next request loads it again.

        The caller holds the gate exclusively and :attr:`starting`: no request
        runs on the worker meanwhile.
        """
        self.parked = True
        worker, self.worker = self.worker, None
        if worker is not None and worker.alive:
            # Killed, not asked to exit: nothing runs on it, and a worker freeing its
            # model at idle priority on a busy device would hold the RAM (and the
            # request waiting for the room) for its whole grace time.
            await worker.stop(grace_s=0.0)
            self.stats.unloaded(reason)
            log.info("unloaded %s (%s)", self.spec.ref, reason)

    async def stop(self, reason: str | None = None) -> None:
        """Stop the worker for good; a loaded one counts as unloaded for ``reason``."""
        self.retired = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self.worker is not None:
            was_loaded = self.worker.alive
            await self.worker.stop()
            if was_loaded and reason is not None:
                self.stats.unloaded(reason)
