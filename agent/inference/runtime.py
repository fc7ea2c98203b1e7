"""The inference runtime: which workers serve which models, restarts, warm swaps.

The device serves a set of models, one :class:`.model_host.ModelHost` per
name. A request names its model (``name`` or ``name@version``) and runs on
that name's serving :class:`.slot.Slot`; an unknown name is refused
(:class:`NoModel`, an HTTP 404 naming what is served). Each serving slot
takes up to ``runtime.parallel`` requests at once (a llama.cpp worker
decodes that many sequences together; other models one at a time); callers
beyond that wait in one bounded queue, and past that bound are turned away
(:class:`Overloaded`, an HTTP 503) instead of piling up memory.

Loaded models: past the loaded-model cap, or short of RAM, the least
recently used idle model is unloaded first (:mod:`.room`); an unloaded model
loads again on its next request, and a model unloads once its keep-alive
(per request, or the default) runs out.

Warm swap, per name: :meth:`InferenceRuntime.prepare` loads a new version in
a new worker and runs its health check there while the old worker keeps
serving; :meth:`InferenceRuntime.activated` then points new requests at it.
A request already running (or holding the old worker) finishes there; the
old worker stops once all of them are done. A candidate that fails is
stopped, and callers never see it. One candidate at a time, device-wide: it
runs only while no request runs on any serving worker
(:mod:`.candidate_freeze`), so the two never share the cores.

Crashes: when a worker dies the request it was running fails with a 5xx,
the crash (or OOM) is counted, and the next request (or the supervisor,
when idle) starts a new worker, pausing longer after each crash in a row.
``crash_limit`` crashes within ``crash_window_s`` mark the model unhealthy
(``/healthz`` answers 503) until it has run that long without one. Other
models' workers are separate processes: they go on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from protocol import InferenceStats, split_model

from ..healthcheck.rules import judge
from .adapters import adapter_key, carry_adapters
from .candidate_freeze import CandidateFreeze
from .memory import mem_available_bytes
from .model_host import ModelHost
from .room import Room
from .slot import NoModel, Overloaded, RuntimeLimits, Slot, Unavailable, slots_of
from .spec import ModelSpec
from .stats import VersionStats
from .supervisor import RemoteError, Worker, WorkerExited, WorkerLoadError

__all__ = ["InferenceRuntime", "NoModel", "Overloaded", "PrepareAborted", "RuntimeLimits",
           "Slot", "Unavailable", "slots_of"]

log = logging.getLogger(__name__)

#: versions reported per heartbeat (the wire caps the list at 8)
MAX_REPORTED_VERSIONS = 8


class PrepareAborted(Exception):
    """:meth:`InferenceRuntime.prepare` was aborted (a newer assignment, or shutdown)."""


class InferenceRuntime:
    """All workers of this agent; see the module docstring."""

    def __init__(self, limits: RuntimeLimits | None = None,
                 worker_argv: Sequence[str] | None = None,
                 mem_available: Callable[[], int | None] = mem_available_bytes) -> None:
        self.limits = limits or RuntimeLimits()
        self._argv = worker_argv
        #: assigned models by name, in the order they were assigned
        self.hosts: dict[str, ModelHost] = {}
        #: names not served yet whose first version is being checked (a model added
        #: to the set): not routed, not in /healthz, until activated
        self._pending: dict[str, ModelHost] = {}
        self._stats: dict[str, VersionStats] = {}
        self._waiting = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        #: a candidate runs only while no request runs on a serving worker
        self.sharing = CandidateFreeze()
        #: the loaded-model cap and free RAM
        self.room = Room(self.hosts, self.limits, mem_available)
        #: one candidate at a time: the freeze shares the cores with one
        self._preparing = asyncio.Lock()

    # -- what runs ---------------------------------------------------------------

    @property
    def serving(self) -> Slot | None:
        """The serving slot of the first assigned model (the only one on most devices)."""
        host = next(iter(self.hosts.values()), None)
        return host.serving if host is not None else None

    def stats_for(self, spec: ModelSpec) -> VersionStats:
        """The counters of ``spec``'s version (kept across swaps, unloads and restarts)."""
        stats = self._stats.get(spec.ref)
        if stats is None:
            stats = self._stats[spec.ref] = VersionStats(spec.name, spec.version)
        return stats

    def _slot(self, spec: ModelSpec) -> Slot:
        return Slot(spec, self.stats_for(spec), self.limits, self._argv)

    def _host(self, name: str) -> ModelHost:
        """The served name's host, made (or taken from the pending ones) if new."""
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = self._pending.pop(name, None) or ModelHost(name)
        return host

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, spec: ModelSpec) -> None:
        """Serve ``spec`` as its name's version now (at start-up): load it, then take
        traffic. Past the loaded-model cap it is not loaded until a request asks.

        A model that does not load is still the one asked for: it is
        reported unavailable and tried again on each request.
        """
        host = self._host(spec.name)
        slot = self._slot(spec)
        async with self.room.lock:
            if why := self.room.no_room(host, spec):
                # Unloading a model just loaded to make room would gain nothing.
                slot.parked = True
                log.info("%s loads on its first request (%s)", spec.ref, why)
            else:
                with contextlib.suppress(WorkerLoadError):
                    await slot.start()
        self._swap(host, slot)

    async def prepare(self, spec: ModelSpec, health_check: dict[str, Any],
                      abort: asyncio.Event, timeout_s: float) -> dict[str, Any]:
        """Load ``spec`` in a new worker beside its name's serving one and
        health-check it there.

        Returns the check's result (``passed``, ``reasons``, details). A
        passed candidate stays loaded until :meth:`activated` takes it (or
        another candidate of the same name replaces it). Raises
        :class:`PrepareAborted` soon after ``abort`` is set.
        """
        host = self.hosts.get(spec.name) or self._pending.setdefault(spec.name,
                                                                     ModelHost(spec.name))
        if host.candidate is not None:
            old, host.candidate = host.candidate, None
            await old.stop()
        slot = self._slot(spec)
        work = asyncio.ensure_future(self._load_and_check(host, slot, health_check))
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
        if work not in done:
            await slot.stop()
            self._forget_pending(host)
            if stop in done:
                raise PrepareAborted("health check aborted")
            return {"passed": False, "reasons": [f"health check timed out after {timeout_s:g} s"]}
        result = work.result()
        if result.get("passed"):
            host.candidate = slot
        else:
            await slot.stop()
            self._forget_pending(host)
        return result

    def _forget_pending(self, host: ModelHost) -> None:
        """A pending name whose candidate is gone is not kept."""
        if host.candidate is None and self._pending.get(host.name) is host:
            del self._pending[host.name]

    async def _load_and_check(self, host: ModelHost, slot: Slot,
                              health_check: dict[str, Any]) -> dict[str, Any]:
        async with self._preparing:
            try:
                return await self._check(host, slot, health_check)
            finally:
                # Checked (or given up): a frozen worker could neither serve nor stop.
                self.sharing.detach()

    async def _check(self, host: ModelHost, slot: Slot,
                     health_check: dict[str, Any]) -> dict[str, Any]:
        try:
            ready = await slot.start(on_spawn=self.sharing.attach)
        except WorkerLoadError as exc:
            return {"passed": False, "reasons": [str(exc)]}
        worker = slot.worker
        assert worker is not None
        try:
            if worker.info.get("embeddings"):
                # One short embedding, timed by the worker: run it alone.
                async with self._serving_quiet(host):
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
    async def _serving_quiet(self, host: ModelHost) -> AsyncIterator[None]:
        """No request runs on the name's serving worker meanwhile (the candidate is thawed)."""
        slot = host.serving
        if slot is None or slot.retired:
            yield
            return
        async with slot.gate.exclusive():
            yield

    def activated(self, spec: ModelSpec) -> None:
        """``spec`` is now its name's active version: move that name's traffic to it.

        The warm candidate when it is this version; otherwise (the version
        was already active, or the agent restarted after its check) it is
        loaded in the background while the current worker keeps serving.
        """
        host = self._host(spec.name)
        serving = host.serving
        if serving is not None and serving.spec == spec and not serving.retired:
            return
        if host.candidate is not None and host.candidate.spec == spec:
            slot, host.candidate = host.candidate, None
            self._swap(host, slot)
            return
        if host.candidate is not None:
            old, host.candidate = host.candidate, None
            self._spawn(old.stop(), "stop-candidate")
        self._spawn(self.serve(spec), f"load-{spec.ref}")

    def _swap(self, host: ModelHost, slot: Slot) -> None:
        slot.supervised = True
        old, host.serving = host.serving, slot
        if old is not None and old is not slot:
            carry_adapters(self, old, slot)
        log.info("serving %s%s", slot.spec.ref, f" (was {old.spec.ref})" if old else "")
        if old is not None and old is not slot:
            old.retired = True
            self._spawn(self._retire(old, "replaced"), f"retire-{old.spec.ref}")

    async def _retire(self, slot: Slot, reason: str) -> None:
        # The gate is FIFO: every request running or queued before us finishes
        # (or, seeing the slot retired, moves to the new one) before the worker stops.
        async with slot.gate.exclusive():
            await slot.stop(reason)
        log.info("stopped the worker of %s (%s)", slot.spec.ref, reason)

    async def remove(self, name: str) -> None:
        """``name`` is no longer assigned: new requests for it are refused
        (:class:`NoModel`), those running or queued finish, then its worker stops."""
        pending = self._pending.pop(name, None)
        if pending is not None and pending.candidate is not None:
            await pending.candidate.stop()
        host = self.hosts.pop(name, None)
        if host is None:
            return
        host.cancel_timer()
        if host.candidate is not None:
            await host.candidate.stop()
        if host.serving is not None:
            await self._retire(host.serving, "removed")

    async def _running(self, host: ModelHost, slot: Slot, deadline: float) -> Worker:
        """The slot's live worker, loaded now if it is not (the caller holds
        ``slot.starting``)."""
        if slot.worker is not None and slot.worker.alive:
            return slot.worker
        async with self.room.lock:
            await self.room.make(host, deadline)
            return await slot.ensure_running()

    def _expire(self, host: ModelHost) -> None:
        """A keep-alive ran out: unload the model unless a request uses it."""
        if host.expired and host.idle and self.hosts.get(host.name) is host:
            self._spawn(host.unload("keep_alive"), f"expire-{host.name}")

    # -- taking requests ---------------------------------------------------------------

    def host_for(self, model: str) -> ModelHost:
        """The assigned model a request's ``model`` (``name`` or ``name@version``, and
        ``+adapter``) names."""
        base, adapter = split_model(model)
        name, _, version = base.partition("@")
        host = self.hosts.get(name)
        slot = host.serving if host is not None else None
        if host is None or slot is None or (version and version != slot.spec.version):
            raise NoModel(self._not_served(model))
        if adapter is not None:
            adapter_key(slot, model)  # raises NoModel when it is not served there
        return host

    def _not_served(self, model: str) -> str:
        served = [h.serving.spec for h in self.hosts.values() if h.serving is not None]
        if not served:
            return "no model is active on this device"
        names = ", ".join(f"{s.name!r} ({s.ref})" for s in served)
        return f"model {model!r} is not served here; this device serves {names}"

    def resolve(self, model: str) -> Slot:
        """The serving slot for a request's ``model`` (``name`` or ``name@version``)."""
        slot = self.host_for(model).serving
        assert slot is not None
        return slot

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a worker now."""
        return self._waiting

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting now, by the ``name@version`` they wait for."""
        return {h.serving.spec.ref: h.waiting for h in self.hosts.values()
                if h.serving is not None}

    @contextlib.asynccontextmanager
    async def lease(self, model: str, keep_alive_s: float | None = None
                    ) -> AsyncIterator[tuple[Slot, Worker]]:
        """One of the slots of the worker serving ``model``, for one request;
        the model is loaded first if it is not. Afterwards it stays loaded for
        ``keep_alive_s`` (None: the default; infinite: until evicted)."""
        host = self.host_for(model)
        slot = host.serving
        assert slot is not None
        if self._waiting >= self.limits.max_queue:
            slot.stats.reject()
            raise Overloaded(f"{self._waiting} requests are already waiting", 1)
        deadline = time.monotonic() + self.limits.queue_timeout_s
        host, slot = await self._queue(model, host, slot, deadline)
        host.cancel_timer()
        host.touch()
        slot.stats.busy += 1
        try:
            try:
                # Inside: a caller cancelled during claim's wait must still
                # give the candidate its cores back.
                await self.sharing.claim()
                async with slot.starting:
                    worker = await self._running(host, slot, deadline)
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
            host.touch()
            slot.gate.release()
            if self.hosts.get(host.name) is host and not self._closed:
                host.keep(self.limits.keep_alive_s if keep_alive_s is None else keep_alive_s,
                          self._expire)
            self.room.released()

    async def _queue(self, model: str, host: ModelHost, slot: Slot,
                     deadline: float) -> tuple[ModelHost, Slot]:
        """Wait for a slot of ``host``'s serving worker; a swap meanwhile moves the
        caller to the new version."""
        self._waiting += 1
        host.waiting += 1
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
                    return host, slot
                # Swapped while we waited: the new version takes us.
                slot.gate.release()
                moved = self.host_for(model)  # raises before the counts change
                host.waiting -= 1
                host = moved
                host.waiting += 1
                slot = host.serving
                assert slot is not None
        finally:
            self._waiting -= 1
            host.waiting -= 1

    async def unload(self, model: str) -> bool:
        """Unload ``model`` now if it is loaded and idle (Ollama's ``keep_alive: 0``
        without a prompt); True when it is not loaded afterwards."""
        host = self.host_for(model)
        if host.idle:
            await host.unload("keep_alive")
        return not host.loaded

    # -- reporting ---------------------------------------------------------------------

    def telemetry(self) -> list[InferenceStats]:
        """Per-version counters since the last heartbeat (every serving version always)."""
        serving = [h.serving.spec.ref for h in self.hosts.values() if h.serving is not None]
        refs = serving + [ref for ref, s in self._stats.items()
                          if ref not in serving and s.active()]
        return [self._stats[ref].take() for ref in refs[:MAX_REPORTED_VERSIONS]]

    def all_stats(self) -> list[VersionStats]:
        """Every version counted since the agent started (for /metrics)."""
        return list(self._stats.values())

    def loaded_refs(self) -> set[str]:
        """``name@version`` of every version whose worker runs now (candidates too)."""
        hosts = [*self.hosts.values(), *self._pending.values()]
        slots = [s for h in hosts for s in (h.serving, h.candidate) if s is not None and s.loaded]
        return {s.spec.ref for s in slots}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(every assigned model ok, details) for /healthz: the worst model's status,
        and each model's own under ``models``."""
        if not self.hosts:
            return False, {"status": "no_model"}
        models = {name: host.health() for name, host in self.hosts.items()}
        statuses = [m["status"] for m in models.values()]
        status = next((s for s in ("unhealthy", "starting") if s in statuses), "ok")
        details: dict[str, Any] = {"status": status, "queue_depth": self._waiting,
                                   "models": models}
        if len(models) == 1:
            # One model: its details at the top as well, as before there could be several.
            ((name, only),) = models.items()
            details.update({"model": name, **{k: v for k, v in only.items()
                                              if k in ("version", "reason")}})
        return status == "ok", details

    async def close(self) -> None:
        """Stop every worker."""
        self._closed = True
        self.sharing.detach()
        for task in list(self._tasks):
            task.cancel()
        for host in [*self.hosts.values(), *self._pending.values()]:
            host.cancel_timer()
            for slot in (host.serving, host.candidate):
                if slot is not None:
                    await slot.stop()
