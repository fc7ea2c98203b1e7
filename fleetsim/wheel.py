"""Which devices' heartbeats fall due between two instants, without a timer each.

Every device beats once a period at its own phase. A heap of 10,000
timers costs a push, a pop and a closure per heartbeat; here the devices
are sorted once by phase, and each tick takes the slice of phases it
passed (two binary searches).
"""

from __future__ import annotations

from bisect import bisect_right


class HeartbeatWheel:
    """Device ``i`` beats at ``first[i] + k * period`` for k = 0, 1, 2, ..."""

    def __init__(self, first: list[float], period: float) -> None:
        if period <= 0:
            raise ValueError("the heartbeat period must be positive")
        self._first = first
        self._period = period
        self._origin = min(first) if first else 0.0
        phases = [(f - self._origin) % period for f in first]
        self._order = sorted(range(len(first)), key=phases.__getitem__)
        self._phases = [phases[i] for i in self._order]
        self._last = self._origin

    def due(self, now: float) -> list[int]:
        """Devices with a beat in (the previous call's ``now``, ``now``], in phase order.

        After a stall longer than a period, each device beats once, not once
        per missed period: a device that was late does not send a backlog.
        """
        if now <= self._last or not self._order:
            return []
        start = max(self._last, now - self._period)
        self._last = now
        a = (start - self._origin) % self._period
        b = (now - self._origin) % self._period
        lo, hi = bisect_right(self._phases, a), bisect_right(self._phases, b)
        # a >= b: the window wraps past the end of the period
        picked = self._order[lo:hi] if a < b else self._order[lo:] + self._order[:hi]
        first = self._first
        return [i for i in picked if first[i] <= now]
