"""Offline detection: a device silent for ``offline_after_missed`` heartbeats is offline.

The agent's MQTT Last Will already reports a clean or detected disconnect;
this catches what the broker cannot see, such as a device that stays
connected but stops reporting, or a broker restart that lost the will.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine, func, update

from .db.models import Device

log = logging.getLogger(__name__)

LIVENESS_JOB_ID = "liveness"


def mark_silent_devices_offline(engine: Engine, now: float, max_silence_s: float) -> int:
    """Mark online devices not heard for ``max_silence_s`` as offline; return how many."""
    cutoff = now - max_silence_s
    # A device never heard live (only retained replays) is judged from when it
    # first appeared, which gives it one full grace period.
    heard = func.coalesce(Device.last_seen, Device.first_seen)
    with engine.begin() as conn:
        result = conn.execute(
            update(Device)
            .where(Device.online.is_(True), heard < cutoff)
            .values(online=False, state_changed_at=now)
        )
    return result.rowcount


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
        if now - self._listening_since < self._max_silence_s:
            return 0
        count = mark_silent_devices_offline(self._engine, now, self._max_silence_s)
        if count:
            log.info("marked %d silent device(s) offline", count)
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
