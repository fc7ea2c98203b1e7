"""Offline detection: a device silent for ``offline_after_missed`` heartbeats is offline.

The agent's MQTT Last Will already reports a clean or detected disconnect;
this catches what the broker cannot see, such as a device that stays
connected but stops reporting, or a broker restart that lost the will.

The check reads the index ``(online, last_seen)``
(:data:`controlplane.db.retention_tables.LIVENESS_INDEX`): each run visits
the online devices silent since the cutoff, not every device, so its cost
follows the devices going offline, not the size of the fleet. Each run also
folds the device counts' appended changes (:mod:`controlplane.db.device_counts`),
the table ``/metrics`` reads instead of counting devices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine, true, update

from .db.device_counts import compact
from .db.models import Device

log = logging.getLogger(__name__)

LIVENESS_JOB_ID = "liveness"


def mark_silent_devices_offline(engine: Engine, now: float, max_silence_s: float) -> int:
    """Mark online devices not heard for ``max_silence_s`` as offline; return how many."""
    cutoff = now - max_silence_s
    online = Device.online == true()  # "= 1", which SQLite matches to the index; "IS 1" not
    # Two range reads of the index rather than one coalesce(), which no index serves.
    # A device never heard live (only retained replays) is judged from when it
    # first appeared, which gives it one full grace period.
    silent = (
        (online, Device.last_seen < cutoff),
        (online, Device.last_seen.is_(None), Device.first_seen < cutoff),
    )
    marked = 0
    with engine.begin() as conn:
        for where in silent:
            marked += conn.execute(
                update(Device).where(*where).values(online=False, state_changed_at=now)
            ).rowcount
    return marked


class LivenessCheck:
    """The periodic job; it holds off until the control plane has listened long enough.

    Right after a control-plane restart every device's ``last_seen`` is as old
    as the downtime; judging them before one full silence period has passed
    would mark the whole fleet offline for a heartbeat.
    """

    def __init__(
        self, engine: Engine, max_silence_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._engine = engine
        self._max_silence_s = max_silence_s
        self._clock = clock
        self._listening_since = clock()

    def __call__(self) -> int:
        """Run one check; return the number of devices marked offline."""
        now = self._clock()
        count = 0
        if now - self._listening_since >= self._max_silence_s:
            count = mark_silent_devices_offline(self._engine, now, self._max_silence_s)
        if count:
            log.info("marked %d silent device(s) offline", count)
        # Also while holding off: a restart's reconnecting fleet appends a
        # change per device. Its own transaction, after the marks committed.
        with self._engine.begin() as conn:
            compact(conn)
        return count


def add_liveness_job(
    scheduler: BaseScheduler, engine: Engine, *, max_silence_s: float, interval_s: float
) -> LivenessCheck:
    """Schedule the liveness check every ``interval_s`` seconds on ``scheduler``."""
    check = LivenessCheck(engine, max_silence_s)
    scheduler.add_job(
        check, "interval", seconds=interval_s, id=LIVENESS_JOB_ID, replace_existing=True
    )
    return check
