"""The retention job: roll up, then prune raw telemetry, rollups and events.

Each run, in this order:

1. PostgreSQL: create the day partitions of ``telemetry`` up to
   ``telemetry_partitions_ahead_days`` ahead (:mod:`.partitions`);
2. fold settled heartbeats into ``telemetry_hourly`` (:mod:`.rollup`);
3. drop raw telemetry older than ``telemetry_raw_days``: whole day
   partitions on PostgreSQL (and old rows of its default partition), batched
   deletes on SQLite (:mod:`.prune`). Never a heartbeat not yet rolled up,
   and never one from after the start of a rollout still in progress (its
   gates compare what devices reported since it began);
4. delete rollups older than ``telemetry_rollup_days`` and events older than
   ``events_days`` (again never those of a rollout in progress);
5. delete history older than ``history_days`` (:mod:`.history`: assignment
   entries no longer active, capability reports replaced by a newer one;
   never those of a rollout in progress). ``events_days`` and
   ``history_days`` are at least ``audit_window_days``, so nothing an
   audit-log entry of that window points to goes; the audit log itself is
   never pruned.

Every replica may run it; the statements are idempotent, and the rollup
mark moves in the same transaction as the rollups it covers. The leader
alone runs it in practice (it is scheduled with the rollout engine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine, Table, func, select, text

from ..config import ControlPlaneSettings
from ..db.models import DeviceEvent, Rollout, TelemetryRow
from ..db.retention_tables import TelemetryHourly
from ..db.statuses import MOVING_ROLLOUT_STATES
from . import partitions
from .history import prune_history
from .prune import prune_older
from .rollup import roll_up, rolled_up_to

log = logging.getLogger(__name__)

RETENTION_JOB_ID = "retention"
DAY_S = 86400.0
#: heartbeats one rollup read takes
ROLLUP_PAGE = 5_000
#: the most of its interval one run may spend deleting (the rest is the ingest's)
BUSY_SHARE = 0.5

telemetry: Table = TelemetryRow.__table__  # type: ignore[assignment]
events: Table = DeviceEvent.__table__  # type: ignore[assignment]
hourly: Table = TelemetryHourly.__table__  # type: ignore[assignment]


@dataclass
class RetentionReport:
    """What one run did."""

    rolled_up: int = 0
    raw_deleted: int = 0
    partitions_created: int = 0
    partitions_dropped: int = 0
    rollups_deleted: int = 0
    events_deleted: int = 0
    history_deleted: int = 0
    snapshots_deleted: int = 0


class RetentionJob:
    """One retention run per call; ``clock`` is wall time (tests hand in their own)."""

    def __init__(self, engine: Engine, settings: ControlPlaneSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock

    def _live_rollouts_since(self) -> float | None:
        """When the oldest rollout still in progress was created, if any."""
        with self._engine.connect() as conn:
            return conn.execute(select(func.min(Rollout.created_at))
                                .where(Rollout.state.in_(MOVING_ROLLOUT_STATES))).scalar()

    def _cutoff(self, now: float, days: int, keep_from: float | None) -> float:
        cutoff = now - days * DAY_S
        return min(cutoff, keep_from) if keep_from is not None else cutoff

    def __call__(self) -> RetentionReport:
        """Run once; return what was done."""
        s, now = self._settings, self._clock()
        report = RetentionReport()
        deadline = time.monotonic() + s.retention_interval_s * BUSY_SHARE
        with self._engine.begin() as conn:
            partitioned = partitions.is_partitioned(conn)
            if partitioned:
                report.partitions_created = len(partitions.ensure_days(
                    conn, now, behind_days=0, ahead_days=s.telemetry_partitions_ahead_days))
        report.rolled_up = roll_up(self._engine, now, page=ROLLUP_PAGE, deadline=deadline)
        keep_from = self._live_rollouts_since()
        raw_cutoff = self._cutoff(now, s.telemetry_raw_days, keep_from)
        with self._engine.connect() as conn:
            mark = rolled_up_to(conn)
        batch = s.retention_batch_rows
        if partitioned:
            report.partitions_dropped = self._drop_days(raw_cutoff, mark)
            report.raw_deleted = self._prune_default(raw_cutoff, mark, batch)
        else:
            # received_at: the server's clock orders SQLite's ids; ts is the device's
            report.raw_deleted = prune_older(self._engine, telemetry, "received_at", raw_cutoff,
                                             batch=batch, deadline=deadline, not_after_id=mark)
        report.rollups_deleted = prune_older(
            self._engine, hourly, "hour", now - s.telemetry_rollup_days * DAY_S,
            batch=batch, deadline=deadline)
        report.events_deleted = prune_older(
            self._engine, events, "received_at",
            self._cutoff(now, s.events_days, keep_from), batch=batch, deadline=deadline)
        report.history_deleted, report.snapshots_deleted = prune_history(
            self._engine, self._cutoff(now, s.history_days, keep_from),
            batch=batch, deadline=deadline)
        if any(vars(report).values()):
            log.info("retention: %s", report)
        return report

    def _drop_days(self, cutoff: float, mark: int) -> int:
        with self._engine.begin() as conn:
            names = partitions.droppable_days(conn, cutoff, mark)
            for name in names:
                partitions.drop_day(conn, name)
        return len(names)

    def _prune_default(self, cutoff: float, mark: int, batch: int) -> int:
        """Old rows of the default partition (a device clock off, or a day never created)."""
        deleted = 0
        while True:
            with self._engine.begin() as conn:
                count = conn.execute(text(
                    f"DELETE FROM {partitions.DEFAULT} WHERE ctid IN (SELECT ctid FROM "
                    f"{partitions.DEFAULT} WHERE ts < :cutoff AND id <= :mark LIMIT :n)"),
                    {"cutoff": cutoff, "mark": mark, "n": batch}).rowcount
            deleted += count
            if count < batch:
                return deleted


def add_retention_job(scheduler: BaseScheduler, engine: Engine,
                      settings: ControlPlaneSettings) -> RetentionJob:
    """Schedule retention every ``retention_interval_s`` on ``scheduler``."""
    job = RetentionJob(engine, settings)
    scheduler.add_job(job, "interval", seconds=settings.retention_interval_s,
                      id=RETENTION_JOB_ID, replace_existing=True)
    return job
