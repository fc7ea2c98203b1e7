"""A candidate worker runs only while the serving worker is idle.

During a warm swap the candidate loads its model and answers its golden
prompts beside the worker that serves traffic. Two llama.cpp thread pools on
the same cores slow each other down far more than twofold (their threads
spin at every barrier, waiting for one that is not scheduled), so callers
would see many times their usual latency for as long as the swap lasts.

Instead the runtime freezes the candidate (SIGSTOP) for as long as any request
runs on the serving worker and thaws it (SIGCONT) when none does. A
waiting request lets the candidate run for at most one short slice first,
so the candidate progresses even under back-to-back traffic and a caller
waits at most that slice. A worker with several slots may never be idle
under steady traffic (one request starts as another ends), so once the
candidate has been frozen for :data:`MAX_FROZEN_S`, new requests wait for
the running ones to finish and the candidate gets its slice. The
candidate's health check is timed on the monotonic clock and the frozen
intervals are subtracted
(:meth:`CandidateFreeze.frozen_between`): what it measures is the model, not the
traffic beside it.

SIGSTOP reaches native code too (a model load is one long C call). A frozen
worker still dies with the agent: its parent-death signal is SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

#: how long a thawed candidate runs before a waiting request takes the cores back
DEFAULT_SLICE_S = 0.05
#: frozen this long, the candidate runs next: new requests wait for the running ones
MAX_FROZEN_S = 0.5
#: frozen intervals kept for timing (a health check spans far fewer)
MAX_INTERVALS = 4096


class CandidateFreeze:
    """Freezes at most one candidate worker while requests run on the serving one."""

    def __init__(self, slice_s: float = DEFAULT_SLICE_S,
                 max_frozen_s: float = MAX_FROZEN_S) -> None:
        self.slice_s, self.max_frozen_s = slice_s, max_frozen_s
        self._pid: int | None = None
        self._frozen_since: float | None = None
        self._thawed_at = 0.0
        self._intervals: list[tuple[float, float]] = []
        #: requests running on the serving worker now (up to its slots): the candidate
        #: stays frozen until the last of them is done
        self._running = 0
        #: set while the candidate is not frozen (requests held back wait for it)
        self._thawed = asyncio.Event()
        self._thawed.set()

    @property
    def frozen(self) -> bool:
        """Whether the candidate is frozen now."""
        return self._frozen_since is not None

    def attach(self, pid: int) -> None:
        """Share the cores with candidate ``pid`` from now on (frozen at once if busy)."""
        self.detach()
        self._pid = pid
        self._intervals = []
        self._thawed_at = time.monotonic()
        if self._running:
            self._freeze()

    def detach(self) -> None:
        """Stop sharing: thaw the candidate (it may be stopped or serve next)."""
        if self._pid is not None:
            self._thaw()
        self._pid = None

    async def claim(self) -> None:
        """Before a request runs on the serving worker: freeze the candidate.

        A candidate that was just thawed keeps the cores for the rest of its
        slice, so it moves forward even when requests never stop coming.
        """
        if self.frozen and self._frozen_since is not None \
                and time.monotonic() - self._frozen_since >= self.max_frozen_s:
            # The serving worker has not been idle for a while: hold this request
            # back until the running ones are done and the candidate is thawed.
            try:
                await self._thawed.wait()
            finally:
                # Counted even when cancelled here: the caller's release() follows.
                self._running += 1
        else:
            self._running += 1
        if self._pid is None or self.frozen:
            return
        wait = self._thawed_at + self.slice_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._pid is not None and not self.frozen and self._running:
            self._freeze()

    def release(self) -> None:
        """After a request on the serving worker: give the candidate the cores back."""
        self._running = max(self._running - 1, 0)
        if self._running == 0 and self._pid is not None:
            self._thaw()

    def frozen_between(self, start: float, end: float) -> float:
        """Seconds the candidate was frozen within ``[start, end]`` (monotonic clock)."""
        total = 0.0
        spans = list(self._intervals)
        if self._frozen_since is not None:
            spans.append((self._frozen_since, time.monotonic()))
        for a, b in spans:
            total += max(0.0, min(b, end) - max(a, start))
        return total

    def _signal(self, sig: signal.Signals) -> bool:
        assert self._pid is not None
        try:
            os.kill(self._pid, sig)
        except ProcessLookupError:
            return False  # it died; its slot notices
        return True

    def _freeze(self) -> None:
        if self._signal(signal.SIGSTOP):
            self._frozen_since = time.monotonic()
            self._thawed.clear()

    def _thaw(self) -> None:
        if self._frozen_since is None:
            return
        now = time.monotonic()
        self._signal(signal.SIGCONT)
        self._intervals.append((self._frozen_since, now))
        del self._intervals[:-MAX_INTERVALS]
        self._frozen_since = None
        self._thawed_at = now
        self._thawed.set()
