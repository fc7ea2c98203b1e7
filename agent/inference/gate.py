"""Admission to one worker: up to ``capacity`` requests at once, first come first served.

A counting semaphore with one more mode: :meth:`Gate.exclusive` waits until
no request runs and keeps new ones out meanwhile (retiring a worker after a
swap, running a candidate's timed check with the serving worker quiet).
Waiters are served strictly in arrival order, exclusive or not, so a
retirement queued behind callers lets them through first, and callers
queued behind a retirement are not starved by later ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Gate:
    """Shared slots for requests, an exclusive turn for whoever must have the worker quiet."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a gate needs at least one slot")
        self.capacity = capacity
        #: requests holding a slot now
        self.running = 0
        self._exclusive = False
        self._waiters: deque[tuple[asyncio.Future[None], bool]] = deque()

    @property
    def idle(self) -> bool:
        """No request runs, none waits and no one holds the exclusive turn."""
        return self.running == 0 and not self._exclusive and not any(
            not future.done() for future, _ in self._waiters)

    def _can_enter(self, exclusive: bool) -> bool:
        if self._exclusive:
            return False
        return self.running == 0 if exclusive else self.running < self.capacity

    def _enter(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = True
        else:
            self.running += 1

    def _wake(self) -> None:
        while self._waiters:
            future, exclusive = self._waiters[0]
            if future.done():  # given up while waiting
                self._waiters.popleft()
                continue
            if not self._can_enter(exclusive):
                return
            self._waiters.popleft()
            self._enter(exclusive)
            future.set_result(None)

    async def _acquire(self, exclusive: bool) -> None:
        if not self._waiters and self._can_enter(exclusive):
            self._enter(exclusive)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, exclusive))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                # Granted just as the wait was cancelled: hand the turn on.
                self._leave(exclusive)
            else:
                future.cancel()
                self._wake()
            raise

    def _leave(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = False
        else:
            self.running -= 1
        self._wake()

    async def acquire(self) -> None:
        """Take one slot, waiting behind everyone who came first."""
        await self._acquire(False)

    def release(self) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        self._leave(False)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Every slot: wait for the requests ahead to finish, keep later ones out."""
        await self._acquire(True)
        try:
            yield
        finally:
            self._leave(True)
