"""One assigned model name on the device: its serving version, its warm-swap
candidate, the requests queued for it and how long it stays loaded.

The runtime (:mod:`.runtime`) keeps one :class:`ModelHost` per name and
routes each request to one; everything about versions, workers and crashes
stays per name, so one model's swap, crash or unload never touches another.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from .slot import Slot


class ModelHost:
    """Everything the runtime keeps for one model name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.serving: Slot | None = None
        self.candidate: Slot | None = None
        #: requests waiting for a slot of this model's worker
        self.waiting = 0
        #: when its latest request ended (monotonic): the least recently used goes first
        self.last_used = time.monotonic()
        #: when it unloads unless used again (monotonic); None: until evicted
        self.expires_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def loaded(self) -> bool:
        """The serving version's worker runs."""
        return self.serving is not None and self.serving.loaded

    @property
    def idle(self) -> bool:
        """Loaded, with no request running or queued: it may be unloaded."""
        slot = self.serving
        return (slot is not None and slot.loaded and not slot.retired
                and self.waiting == 0 and slot.gate.idle)

    def touch(self) -> None:
        """A request for it started or ended."""
        self.last_used = time.monotonic()

    def keep(self, seconds: float | None, on_expiry: Callable[[ModelHost], None]) -> None:
        """Stay loaded ``seconds`` from now (None or infinite: until evicted), then
        ``on_expiry(self)``."""
        self.cancel_timer()
        if seconds is None or math.isinf(seconds):
            self.expires_at = None
            return
        self.expires_at = time.monotonic() + max(seconds, 0.0)
        self._timer = asyncio.get_running_loop().call_later(max(seconds, 0.0), on_expiry,
                                                            self)

    def cancel_timer(self) -> None:
        """Forget the keep-alive timer (the model is used again, or removed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def expired(self) -> bool:
        """Its keep-alive has run out."""
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def expires_wall(self) -> float | None:
        """When it unloads, as a Unix time (None: until evicted)."""
        if self.expires_at is None:
            return None
        return time.time() + (self.expires_at - time.monotonic())

    async def unload(self, reason: str) -> None:
        """Stop the serving worker (it loads again on the next request)."""
        slot = self.serving
        if slot is None:
            return
        async with slot.gate.exclusive(), slot.starting:
            await slot.unload(reason)
        self.cancel_timer()
        self.expires_at = None

    def health(self) -> dict[str, Any]:
        """This model's line of ``/healthz``: ``status`` is ``ok``, ``starting`` or
        ``unhealthy`` (an unloaded model is ok: it loads on the next request)."""
        slot = self.serving
        if slot is None:
            return {"status": "starting", "loaded": False}
        details: dict[str, Any] = {"version": slot.spec.version, "loaded": slot.loaded,
                                   "queue_depth": self.waiting}
        if problem := slot.unhealthy:
            return {"status": "unhealthy", "reason": problem, **details}
        if slot.loaded or slot.parked:
            return {"status": "ok", **details}
        return {"status": "starting", **details}
