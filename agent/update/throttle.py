"""A download's rate cap, and the pause a download takes when its policy says so.

:class:`~agent.update.throttled_fetcher.ThrottledFetcher` wraps any
:class:`~agent.update.fetcher.Fetcher`; the body it returns yields the same
chunks, each paid for from a :class:`TokenBucket` before the next is read.
The bucket refills at the cap and holds at most a small burst
(:func:`burst_for`), so the rate is smooth over a second, not a fast start
followed by a long stall: the socket's receive buffer fills, TCP's window
closes, and the sender slows to the cap.

The same wrapper asks ``hold()`` every :data:`HOLD_CHECK_S` seconds; when
it names a reason (the link became metered, the download window closed) the
download stops with :class:`DownloadHeld`. The partial file keeps every byte
received, and the download resumes with ``Range`` once the pipeline's wait
is over.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: how often (seconds) a running download asks whether it must pause
HOLD_CHECK_S = 1.0
#: the burst a bucket allows: this fraction of a second at the cap...
BURST_FRACTION = 0.1
#: ...but at least this many bytes (one network read is ~64 KiB)
MIN_BURST = 16 * 1024


class DownloadHeld(Exception):
    """The download paused for its policy (``reason``); its partial file is kept."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def burst_for(rate: float) -> float:
    """The bucket size for a cap of ``rate`` bytes per second."""
    return max(rate * BURST_FRACTION, MIN_BURST)


class TokenBucket:
    """Bytes may pass at ``rate`` per second, at most ``burst`` at once; not thread-safe."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst_for(rate) if burst is None else burst
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def take(self, n: int) -> float:
        """Spend ``n`` bytes; returns the seconds to wait before the next read.

        Tokens may go negative (a chunk larger than the burst): the debt is
        paid by waiting, so the long-run rate is exact whatever the chunk size.
        """
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def stall_floor(min_bytes_per_s: float, rate: float | None) -> float:
    """The throughput floor under a cap: never above half the cap, so the cap cannot trip it."""
    return min_bytes_per_s if not rate else min(min_bytes_per_s, rate / 2)
