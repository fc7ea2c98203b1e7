"""History retention with a controlled clock, on SQLite and on a real PostgreSQL.

Assignment entries that ended and capability reports a newer one replaced
go after ``history_days``; active entries, each device's newest report,
the entries of a rollout in progress and everything inside the audit
window stay; events keep their own period, bounded below by the same
window.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, insert, select

import protocol as p
from controlplane.config import ControlPlaneSettings
from controlplane.db.models import AssignmentRecord, CapabilitySnapshot, DeviceEvent, Rollout
from controlplane.db.writes import BatchStore, IngestItem
from controlplane.retention import RetentionJob
from controlplane.retention.prune import delete_matching
from tests.support.controlplane import hello
from tests.support.migrated import KINDS, add_release, add_rollout, migrated_engine

DAY = 86400.0
NOW = time.time()


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database of each kind."""
    yield from migrated_engine(request, tmp_path)


def _settings(tmp_path: Path, engine: Engine, **extra: Any) -> ControlPlaneSettings:
    return ControlPlaneSettings(data_dir=tmp_path, database_url=str(engine.url), **extra)


def _hello(device: str, days_ago: float, ram_gib: int) -> IngestItem:
    at = NOW - days_ago * DAY
    return IngestItem(p.TopicKind.HELLO, hello(device, ram_bytes=ram_gib * 1024**3), at, False)


def _entry(conn: Connection, version_id: int, device: str, sequence: int, *,
           ended_days_ago: float | None, rollout_id: str | None = None) -> None:
    """An entry issued a year and a half ago; active when it never ended."""
    conn.execute(insert(AssignmentRecord), [{
        "assignment_id": f"{device}-{sequence}", "device_id": device, "version_id": version_id,
        "model_name": "m", "ref": "m@1.1.0", "tier": "micro", "sequence": sequence,
        "issued_at": NOW - 550 * DAY, "expires_at": NOW + DAY, "rollout_id": rollout_id,
        "kind": "assign", "status": "active" if ended_days_ago is None else "superseded",
        "ended_at": None if ended_days_ago is None else NOW - ended_days_ago * DAY,
        "envelope": None, "policy": None}])


def _kept(engine: Engine, column: Any) -> list:
    with engine.connect() as conn:
        return sorted(conn.execute(select(column)).scalars().all())


def test_history_leaves_after_its_period_and_what_is_needed_stays(engine: Engine,
                                                                  tmp_path: Path) -> None:
    store = BatchStore(engine)
    # a device that reported three different capability sets, one that reported one
    for days_ago, ram in ((400, 2), (300, 4), (1, 8)):
        store.write([_hello("h1", days_ago, ram)])
    store.write([_hello("h2", 400, 2)])
    with engine.begin() as conn:
        version_id = add_release(conn)
        add_rollout(conn, "moving", version_id, created_at=NOW - 200 * DAY)
        add_rollout(conn, "done", version_id, state="completed", created_at=NOW - 500 * DAY)
        _entry(conn, version_id, "h1", 1, ended_days_ago=400)  # old history: goes
        _entry(conn, version_id, "h1", 2, ended_days_ago=400, rollout_id="done")  # goes
        # older than history_days, but ended after a rollout in progress began: stays
        _entry(conn, version_id, "h1", 3, ended_days_ago=190, rollout_id="moving")
        _entry(conn, version_id, "h1", 4, ended_days_ago=None)  # active: stays
        _entry(conn, version_id, "h2", 1, ended_days_ago=10)  # recent: stays
    settings = _settings(tmp_path, engine, history_days=180)
    report = RetentionJob(engine, settings, clock=lambda: NOW)()
    assert (report.history_deleted, report.snapshots_deleted) == (2, 2)
    assert _kept(engine, AssignmentRecord.assignment_id) == ["h1-3", "h1-4", "h2-1"]
    with engine.connect() as conn:
        reports = conn.execute(select(CapabilitySnapshot.device_id,
                                      CapabilitySnapshot.capabilities)).all()
    # h1's newest report and h2's only one, however old
    assert sorted((d, c["ram_bytes"] // 1024**3) for d, c in reports) == [("h1", 8), ("h2", 2)]
    # once the moving rollout has finished, its old entry is history like the rest
    with engine.begin() as conn:
        conn.execute(Rollout.__table__.update().where(Rollout.id == "moving")
                     .values(state="completed"))
    assert RetentionJob(engine, settings, clock=lambda: NOW)().history_deleted == 1
    assert _kept(engine, AssignmentRecord.assignment_id) == ["h1-4", "h2-1"]


def test_nothing_inside_the_audit_window_goes(engine: Engine, tmp_path: Path) -> None:
    store = BatchStore(engine)
    store.write([_hello("w1", 40, 2)])
    events = [IngestItem(p.TopicKind.EVENTS, p.Event(device_id="w1", ts=NOW - d * DAY, seq=d,
                                                     type=p.EventType.DOWNLOADING),
                         NOW - d * DAY, False) for d in (31, 29, 1)]
    store.write(sorted(events, key=lambda i: i.received_at))
    with engine.begin() as conn:
        version_id = add_release(conn)
        _entry(conn, version_id, "w1", 1, ended_days_ago=31)
        _entry(conn, version_id, "w1", 2, ended_days_ago=29)
    settings = _settings(tmp_path, engine, events_days=30, history_days=30,
                         audit_window_days=30)
    RetentionJob(engine, settings, clock=lambda: NOW)()
    assert _kept(engine, AssignmentRecord.assignment_id) == ["w1-2"]
    assert _kept(engine, DeviceEvent.seq) == [1, 29]


@pytest.mark.parametrize("name", ["events_days", "history_days"])
def test_a_period_shorter_than_the_audit_window_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError, match=f"{name} must be at least audit_window_days"):
        ControlPlaneSettings(data_dir=tmp_path, audit_window_days=30, **{name: 7})


def test_batched_history_deletes_stop_at_the_deadline(engine: Engine) -> None:
    """Each batch is its own transaction; a run ends at its deadline, the rest goes next run."""
    BatchStore(engine).write([_hello("b1", 1, 2)])
    with engine.begin() as conn:
        version_id = add_release(conn)
        for seq in range(1, 26):
            _entry(conn, version_id, "b1", seq, ended_days_ago=400)
    table = AssignmentRecord.__table__
    ticks = iter(range(100))
    old = table.c.ended_at < NOW - DAY
    assert delete_matching(engine, table, old, batch=10, deadline=2,
                           clock=lambda: next(ticks)) == 20
    assert delete_matching(engine, table, old, batch=10, deadline=time.monotonic() + 60) == 5
    assert _kept(engine, AssignmentRecord.assignment_id) == []
