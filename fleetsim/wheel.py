"""Which devices' heartbeats fall due between two instants, without a timer each.

Every device beats once a period at its own phase. A heap of 10,000
timers costs a push, a pop and a closure per heartbeat; here the devices
are sorted once by phase, and each tick takes the slice of phases it
passed (two binary searches).
"""

from __future__ import annotations

from bisect import bisect_right


class HeartbeatWheel:
    """Device ``i`` beats at ``first[i] + k * period`` for k = 0, 1, 2, ...

    ``catch_up`` is how many whole periods of beats a late tick still owes:
    0 (a device that was late sends one beat, not a backlog, as an agent
    does) or more, for a load generator that must keep its asked rate when
    the machine holds its thread back for a moment.
    """

    def __init__(self, first: list[float], period: float, catch_up: int = 0) -> None:
        if period <= 0:
            raise ValueError("the heartbeat period must be positive")
        if catch_up < 0:
            raise ValueError("catch_up counts periods: 0 or more")
        self._first = first
        self._period = period
        self._catch_up = catch_up
        self._origin = min(first) if first else 0.0
        phases = [(f - self._origin) % period for f in first]
        self._order = sorted(range(len(first)), key=phases.__getitem__)
        self._phases = [phases[i] for i in self._order]
        self._last = self._origin

    def _between(self, start: float, end: float) -> list[int]:
        """Devices whose phase falls in (start, end], a span of at most one period."""
        a = (start - self._origin) % self._period
        b = (end - self._origin) % self._period
        lo, hi = bisect_right(self._phases, a), bisect_right(self._phases, b)
        # a >= b: the window wraps past the end of the period (or is a whole period)
        return self._order[lo:hi] if a < b else self._order[lo:] + self._order[:hi]

    def due(self, now: float) -> list[int]:
        """Devices with a beat in (the previous call's ``now``, ``now``], in phase order.

        After a stall of a period or more, each device beats as often as it
        was due in the gap, but at most ``catch_up + 1`` times.
        """
        last = self._last
        if now <= last or not self._order:
            return []
        self._last = now
        first = self._first
        owed = int((now - last) // self._period)
        if owed == 0:
            return [i for i in self._between(last, now) if first[i] <= now]
        # A stall of a period or more (rare): count each device's beats in the gap.
        cap, period, picked = self._catch_up + 1, self._period, []
        for i in self._order:
            start = first[i]
            if start > now:
                continue
            owed = int((now - start) // period) + 1
            if start <= last:
                owed -= int((last - start) // period) + 1
            picked += [i] * min(owed, cap)
        return picked
