"""The inference runtime: which worker serves, restarts after crashes, warm swaps.

One :class:`Slot` per model version a worker runs. The serving slot takes
up to ``runtime.parallel`` requests at once (a llama.cpp worker decodes that
many sequences together; other models one at a time); callers beyond that
wait in a bounded queue in front of it, and past that bound are turned away
(:class:`Overloaded`, an HTTP 503) instead of piling up memory.

Warm swap: :meth:`InferenceRuntime.prepare` loads a new version in a new
worker and runs its health check there while the old worker keeps serving;
:meth:`InferenceRuntime.activated` then points new requests at it. A
request already running (or holding the old worker) finishes there; the old
worker stops once all of them are done. A candidate that fails is stopped, and
callers never see it. The candidate runs only between the serving worker's
requests (:mod:`.candidate_freeze`), so a swap does not slow callers down.

Crashes: when a worker dies the request it was running fails with a 5xx,
the crash (or OOM) is counted, and the next request (or the supervisor,
when idle) starts a new worker, pausing longer after each crash in a row.
``crash_limit`` crashes within ``crash_window_s`` mark the model unhealthy
(``/healthz`` answers 503) until it has run that long without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import InferenceStats

from ..healthcheck.rules import judge
from .candidate_freeze import CandidateFreeze
from .gate import Gate
from .spec import ModelSpec
from .stats import VersionStats
from .supervisor import RemoteError, Worker, WorkerExited, WorkerLoadError

log = logging.getLogger(__name__)

#: longest pause before restarting a worker that keeps crashing
MAX_RESTART_DELAY_S = 30.0
#: versions reported per heartbeat (the wire caps the list at 8)
MAX_REPORTED_VERSIONS = 8


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
    """The knobs of :class:`InferenceRuntime` (from the agent config)."""

    max_queue: int = 8
    queue_timeout_s: float = 60.0
    load_timeout_s: float = 120.0
    crash_limit: int = 3
    crash_window_s: float = 300.0


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
        #: held while the worker (re)starts: one start at a time, whoever asks
        self.starting = asyncio.Lock()
        stats.slots = self.gate.capacity
        self.retired = False
        #: restarted after a crash; only the serving slot is (a candidate just fails)
        self.supervised = False
        self.load_error: str | None = None
        self.crash_times: deque[float] = deque(maxlen=64)
        self._crashes_in_a_row = 0
        self._not_before = 0.0
        self._watcher: asyncio.Task[None] | None = None

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
        try:
            ready = await worker.start(self._limits.load_timeout_s, on_spawn)
        except WorkerLoadError as exc:
            self.load_error = str(exc)
            self._backoff()
            raise
        self.load_error = None
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
            if not self.retired and self.worker is worker:
                with contextlib.suppress(WorkerLoadError):
                    await self.start()

    async def ensure_running(self) -> Worker:
        """The live worker, started again if it died (the caller holds :attr:`starting`)."""
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

    async def stop(self) -> None:
        """Stop the worker for good."""
        self.retired = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self.worker is not None:
            await self.worker.stop()


class InferenceRuntime:
    """All workers of this agent; see the module docstring."""

    def __init__(self, limits: RuntimeLimits | None = None,
                 worker_argv: Sequence[str] | None = None) -> None:
        self.limits = limits or RuntimeLimits()
        self._argv = worker_argv
        self.serving: Slot | None = None
        self.candidate: Slot | None = None
        self._stats: dict[str, VersionStats] = {}
        self._waiting = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        #: a candidate runs only between the serving worker's requests
        self.sharing = CandidateFreeze()

    # -- what runs ---------------------------------------------------------------

    def stats_for(self, spec: ModelSpec) -> VersionStats:
        """The counters of ``spec``'s version (kept across swaps and restarts)."""
        stats = self._stats.get(spec.ref)
        if stats is None:
            stats = self._stats[spec.ref] = VersionStats(spec.name, spec.version)
        return stats

    def _slot(self, spec: ModelSpec) -> Slot:
        return Slot(spec, self.stats_for(spec), self.limits, self._argv)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, spec: ModelSpec) -> None:
        """Serve ``spec`` now (at start-up): load it, then take traffic.

        A model that does not load is still the one asked for: it is
        reported unavailable and tried again on each request.
        """
        slot = self._slot(spec)
        with contextlib.suppress(WorkerLoadError):
            await slot.start()
        self._swap(slot)

    async def prepare(self, spec: ModelSpec, health_check: dict[str, Any],
                      abort: asyncio.Event, timeout_s: float) -> dict[str, Any]:
        """Load ``spec`` in a new worker beside the serving one and health-check it there.

        Returns the check's result (``passed``, ``reasons``, details). A
        passed candidate stays loaded until :meth:`activated` takes it (or
        another candidate replaces it). Raises :class:`PrepareAborted` soon
        after ``abort`` is set.
        """
        if self.candidate is not None:
            old, self.candidate = self.candidate, None
            await old.stop()
        slot = self._slot(spec)
        work = asyncio.ensure_future(self._load_and_check(slot, health_check))
        stop = asyncio.ensure_future(abort.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        finally:
            stop.cancel()
            # Checked (or given up): a frozen worker could neither serve nor stop.
            self.sharing.detach()
        if work not in done:
            await slot.stop()
            if stop in done:
                raise PrepareAborted("health check aborted")
            return {"passed": False, "reasons": [f"health check timed out after {timeout_s:g} s"]}
        result = work.result()
        if result.get("passed"):
            self.candidate = slot
        else:
            await slot.stop()
        return result

    async def _load_and_check(self, slot: Slot, health_check: dict[str, Any]) -> dict[str, Any]:
        try:
            ready = await slot.start(on_spawn=self.sharing.attach)
        except WorkerLoadError as exc:
            return {"passed": False, "reasons": [str(exc)]}
        worker = slot.worker
        assert worker is not None
        try:
            if worker.info.get("embeddings"):
                # One short embedding, timed by the worker: run it alone.
                async with self._serving_quiet():
                    done = await worker.call("check_embeddings", {"health_check": health_check})
                result = {k: v for k, v in done.items() if k not in ("op", "id")}
            else:
                outcomes = [await worker.call("check_prompt", {"item": item})
                            for item in health_check.get("golden_prompts") or []]
                result = judge(health_check, outcomes, self.sharing.frozen_between)
        except WorkerExited as exc:
            return {"passed": False, "reasons": [f"health check crashed: {exc}"]}
        except RemoteError as exc:
            return {"passed": False, "reasons": [f"health check failed: {exc}"]}
        result["load_ms"] = ready.get("load_ms")
        return result

    @contextlib.asynccontextmanager
    async def _serving_quiet(self) -> AsyncIterator[None]:
        """No request runs on the serving worker meanwhile (the candidate is thawed)."""
        slot = self.serving
        if slot is None or slot.retired:
            yield
            return
        async with slot.gate.exclusive():
            yield

    def activated(self, spec: ModelSpec) -> None:
        """``spec`` is now the active model: move traffic to it.

        The warm candidate when it is this version; otherwise (the version
        was already active, or the agent restarted after its check) it is
        loaded in the background while the current worker keeps serving.
        """
        if self.serving is not None and self.serving.spec == spec and not self.serving.retired:
            return
        if self.candidate is not None and self.candidate.spec == spec:
            slot, self.candidate = self.candidate, None
            self._swap(slot)
            return
        if self.candidate is not None:
            old, self.candidate = self.candidate, None
            self._spawn(old.stop(), "stop-candidate")
        self._spawn(self.serve(spec), f"load-{spec.ref}")

    def _swap(self, slot: Slot) -> None:
        slot.supervised = True
        old, self.serving = self.serving, slot
        log.info("serving %s%s", slot.spec.ref, f" (was {old.spec.ref})" if old else "")
        if old is not None and old is not slot:
            old.retired = True
            self._spawn(self._retire(old), f"retire-{old.spec.ref}")

    async def _retire(self, slot: Slot) -> None:
        # The gate is FIFO: every request running or queued before us finishes
        # (or, seeing the slot retired, moves to the new one) before the worker stops.
        async with slot.gate.exclusive():
            await slot.stop()
        log.info("stopped the worker of %s", slot.spec.ref)

    # -- taking requests ---------------------------------------------------------------

    def resolve(self, model: str) -> Slot:
        """The serving slot for a request's ``model`` (``name`` or ``name@version``)."""
        slot = self.serving
        if slot is None:
            raise NoModel("no model is active on this device")
        if model not in (slot.spec.name, slot.spec.ref):
            raise NoModel(f"model {model!r} is not served here; this device serves "
                          f"{slot.spec.name!r} ({slot.spec.ref})")
        return slot

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a worker now."""
        return self._waiting

    @contextlib.asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[tuple[Slot, Worker]]:
        """One of the slots of the worker serving ``model``, for one request."""
        slot = self.resolve(model)
        if self._waiting >= self.limits.max_queue:
            slot.stats.reject()
            raise Overloaded(f"{self._waiting} requests are already waiting", 1)
        self._waiting += 1
        deadline = time.monotonic() + self.limits.queue_timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(slot.gate.acquire(), max(remaining, 0.001))
                except TimeoutError:
                    slot.stats.reject()
                    raise Overloaded(f"no worker free within "
                                     f"{self.limits.queue_timeout_s:g} s", 5) from None
                if not slot.retired:
                    break
                # Swapped while we waited: the new version takes us.
                slot.gate.release()
                slot = self.resolve(model)
        finally:
            self._waiting -= 1
        slot.stats.busy += 1
        try:
            try:
                # Inside: a caller cancelled during claim's wait must still
                # give the candidate its cores back.
                await self.sharing.claim()
                async with slot.starting:
                    worker = await slot.ensure_running()
                yield slot, worker
            except WorkerExited as exc:
                if self._closed:
                    # Not a crash to retry in a second: the agent stopped its workers.
                    raise Unavailable("the agent is stopping; the request was cut short") \
                        from exc
                raise
            finally:
                self.sharing.release()
        finally:
            slot.stats.busy -= 1
            slot.gate.release()

    # -- reporting ---------------------------------------------------------------------

    def telemetry(self) -> list[InferenceStats]:
        """Per-version counters since the last heartbeat (the serving version always)."""
        serving = self.serving.spec.ref if self.serving else None
        out = [s.take() for ref, s in self._stats.items() if ref == serving or s.active()]
        return out[-MAX_REPORTED_VERSIONS:]

    def all_stats(self) -> list[VersionStats]:
        """Every version counted since the agent started (for /metrics)."""
        return list(self._stats.values())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(serving and healthy, details) for /healthz."""
        slot = self.serving
        if slot is None:
            return False, {"status": "no_model"}
        problem = slot.unhealthy
        details: dict[str, Any] = {"model": slot.spec.name, "version": slot.spec.version,
                                   "queue_depth": self._waiting}
        if problem:
            return False, {"status": "unhealthy", "reason": problem, **details}
        if slot.worker is None or not slot.worker.alive:
            return False, {"status": "starting", **details}
        return True, {"status": "ok", **details}

    async def close(self) -> None:
        """Stop every worker."""
        self._closed = True
        self.sharing.detach()
        for task in list(self._tasks):
            task.cancel()
        for slot in (self.serving, self.candidate):
            if slot is not None:
                await slot.stop()


class PrepareAborted(Exception):
    """:meth:`InferenceRuntime.prepare` was aborted (a newer assignment, or shutdown)."""
