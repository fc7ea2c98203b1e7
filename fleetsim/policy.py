"""Update windows and update locks on simulated devices, on a simulated clock.

A scenario with ``sets: true`` makes its devices speak ``slmfleet.hello/2``
and read signed sets (:func:`protocol.verify_desired`), the form that
carries each entry's :class:`protocol.UpdatePolicy`. Such a device then
honours the policy as an agent does, judged with
:mod:`protocol.update_policy` against the simulator's clock
(:class:`SimClock`: the scenario's ``clock_start``, running at real speed,
so a window can open a minute into a run):

* outside the ``download_window`` it reports ``waiting_window`` with the
  next opening and downloads nothing;
* after the health check it reports ``deferred`` while the
  ``activation_window`` is closed, or while an app holds an update lock
  (``locks``: a fraction of the devices hold one for a while from the
  start), unless the entry's lock override was issued after the lock was
  taken.

Each waiting device looks again when its window opens (plus up to
:data:`POLL_S`, as an agent polls) or its lock is released; nothing polls
10,000 windows a second.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from protocol import EventType, LockOverride, UpdatePolicy

#: the most a device waits past an opening before it looks (an agent's poll period)
POLL_S = 1.0
#: a window that never opens again is looked at this often (sim seconds)
IDLE_LOOK_S = 3600.0


class SimClock:
    """The simulated devices' clock: ``start`` (epoch seconds) at creation, then real speed."""

    def __init__(self, start: float | None) -> None:
        self._offset = 0.0 if start is None else start - time.time()

    def __call__(self) -> float:
        """Simulated epoch seconds now."""
        return time.time() + self._offset

    def monotonic_at(self, sim_time: float) -> float:
        """The ``time.monotonic()`` instant when the simulated clock reads ``sim_time``."""
        return time.monotonic() + (sim_time - self())


@dataclass(frozen=True, slots=True)
class AppLock:
    """An update lock an app on the device holds, as the agent would record it."""

    reason: str
    #: real epoch seconds (an operator's override is compared with it)
    taken_at: float
    #: simulated epoch seconds when the app releases it
    until: float


@dataclass(frozen=True, slots=True)
class Hold:
    """Why a step may not run yet, and when to look again (simulated time)."""

    event: EventType
    reason: str
    retry_at: float


def iso(ts: float) -> str:
    """``ts`` as ISO 8601 UTC, as agents name the next opening in a reason."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def overridden(lock: AppLock, override: LockOverride | None) -> bool:
    """Whether an operator's ``override`` lifts ``lock``."""
    return override is not None and override.issued_at >= lock.taken_at


def hold(gate: str, policy: UpdatePolicy | None, lock: AppLock | None, now: float,
         rng: random.Random) -> Hold | None:
    """What holds the ``download`` or ``activate`` gate at simulated time ``now``; None: go."""
    window = None
    if policy is not None:
        window = policy.download_window if gate == "download" else policy.activation_window
    if window is not None and not window.is_open(now):
        opens = window.next_open(now)
        what = "download" if gate == "download" else "activation"
        event = EventType.WAITING_WINDOW if gate == "download" else EventType.DEFERRED
        if opens is None:
            return Hold(event, f"{what} window never opens", now + IDLE_LOOK_S)
        return Hold(event, f"{what} window opens at {iso(opens)}",
                    opens + rng.uniform(0, POLL_S))
    if gate == "activate" and lock is not None and now < lock.until \
            and not overridden(lock, policy.lock_override if policy else None):
        return Hold(EventType.DEFERRED, f"locked: {lock.reason}", lock.until)
    return None


def app_locks(count: int, fraction: float, hold_s: float, reason: str, start: float,
              seed: int) -> list[AppLock | None]:
    """For ``count`` devices, the lock each holds from ``start`` (sim time), or None:
    ``fraction`` of them hold one for ``hold_s`` (+-50 %)."""
    rng = random.Random(seed ^ 0x10C)
    taken = time.time()
    return [AppLock(reason, taken, start + hold_s * rng.uniform(0.5, 1.5))
            if rng.random() < fraction else None for _ in range(count)]
