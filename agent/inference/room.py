"""Room for one more loaded model: the loaded-model cap and free RAM.

With ``max_loaded`` set, loading one more model than that first unloads the
least recently used *idle* model (no request running or queued on it); with
none idle, the load waits (within the caller's queue time) until one is.
The RAM a model needs (:mod:`.memory`) is checked against ``MemAvailable``
minus the OS reserve the same way, except that with no idle model left to
unload the load goes ahead: the free-memory figure moves with every other
process on the device, while the cap is the admin's word.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .memory import ram_needed
from .model_host import ModelHost
from .slot import Overloaded, RuntimeLimits, slots_of
from .spec import ModelSpec

log = logging.getLogger(__name__)


class Room:
    """Decides whether a model may load now and unloads others to make room."""

    def __init__(self, hosts: dict[str, ModelHost], limits: RuntimeLimits,
                 mem_available: Callable[[], int | None]) -> None:
        self.hosts, self.limits, self._mem_available = hosts, limits, mem_available
        #: one load (and the unloads that make room for it) at a time, so two loads
        #: cannot both pass the cap
        self.lock = asyncio.Lock()
        #: set (and replaced) whenever a request ends: a load waiting for an idle model
        self._released = asyncio.Event()

    def released(self) -> None:
        """A request ended: a load waiting for an idle model looks again."""
        self._released.set()
        self._released = asyncio.Event()

    def over_cap(self, host: ModelHost) -> bool:
        """Loading ``host`` now would pass the loaded-model cap."""
        cap = self.limits.max_loaded
        others = sum(1 for h in self.hosts.values() if h is not host and h.loaded)
        return cap > 0 and others + 1 > cap

    def short_of_ram(self, spec: ModelSpec) -> bool:
        """Loading ``spec`` now needs more RAM than is free past the OS reserve."""
        available = self._mem_available()
        if available is None:
            return False
        return ram_needed(spec, slots_of(spec)) > available - self.limits.os_reserve_bytes

    def no_room(self, host: ModelHost, spec: ModelSpec) -> str | None:
        """Why ``spec`` cannot load beside the loaded models without unloading one."""
        if self.over_cap(host):
            return f"{self.limits.max_loaded} models are loaded, the cap"
        others = any(h.loaded for h in self.hosts.values() if h is not host)
        if others and self.short_of_ram(spec):
            return "not enough RAM free beside the loaded models"
        return None

    async def make(self, host: ModelHost, deadline: float) -> None:
        """Unload least recently used idle models until ``host`` may load (the
        caller holds :attr:`lock`); :class:`Overloaded` past ``deadline``."""
        assert host.serving is not None
        while True:
            over_cap = self.over_cap(host)
            others = [h for h in self.hosts.values() if h is not host and h.loaded]
            short = bool(others) and not over_cap and self.short_of_ram(host.serving.spec)
            if not over_cap and not short:
                return
            victim = min((h for h in others if h.idle), key=lambda h: h.last_used, default=None)
            if victim is not None:
                await victim.unload("lru" if over_cap else "memory")
                continue
            if not over_cap:
                log.warning("loading %s with less RAM free than it needs: every other "
                            "loaded model is busy", host.serving.spec.ref)
                return
            released = self._released
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(released.wait(), max(remaining, 0.001))
            except TimeoutError:
                raise Overloaded(f"{self.limits.max_loaded} models are loaded (the cap) and "
                                 f"busy; {host.name} could not load within "
                                 f"{self.limits.queue_timeout_s:g} s", 5) from None
