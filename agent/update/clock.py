"""The wall clock the update policy reads, and waits that wake at a computed time.

Windows and lease expiries are wall-clock times (epoch seconds), so the
pipeline never polls: it computes when the next thing can change and sleeps
until then (:meth:`Clock.sleep_until`), woken early by an event (an update
lock released, a newer document, the agent stopping).

:class:`SystemClock` is the real one. Its sleeps are cut into pieces of at
most :data:`MAX_SLEEP_S` so that a wall clock stepped by NTP, or a device
that was suspended, is noticed within minutes rather than after a sleep
computed against the old time. A test passes its own :class:`Clock` whose
``now`` it sets; its sleeps wake whenever the time is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

#: the longest one real sleep lasts before the wall clock is read again
MAX_SLEEP_S = 300.0


async def first_of(events: Iterable[asyncio.Event], timeout: float | None) -> bool:
    """Wait until one of ``events`` is set or ``timeout`` seconds passed; True if one was set."""
    events = list(events)
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
    return bool(done)


class Clock(ABC):
    """Wall-clock time for the update policy."""

    @abstractmethod
    def now(self) -> float:
        """The time now, epoch seconds (safe to call from any thread)."""

    @abstractmethod
    async def sleep_until(self, when: float | None, wake: Iterable[asyncio.Event] = (),
                          max_s: float | None = None) -> None:
        """Return at ``when`` (None: never), when one of ``wake`` is set, or after
        ``max_s`` real seconds, whichever comes first. It may return early: the
        caller always checks again what it waited for."""


class SystemClock(Clock):
    """The system's clock."""

    def now(self) -> float:
        """See :meth:`Clock.now`."""
        return time.time()

    async def sleep_until(self, when: float | None, wake: Iterable[asyncio.Event] = (),
                          max_s: float | None = None) -> None:
        """See :meth:`Clock.sleep_until`."""
        timeout = MAX_SLEEP_S if max_s is None else min(max_s, MAX_SLEEP_S)
        if when is not None:
            timeout = min(timeout, max(when - self.now(), 0.0))
        await first_of(wake, timeout)
