"""Telemetry retention with a controlled clock, on SQLite and on a real PostgreSQL.

Heartbeats go in through the ingest's own batch writer
(:class:`controlplane.db.writes.BatchStore`), stamped with the test's clock;
the retention job (:class:`controlplane.retention.RetentionJob`) runs at
chosen times. What must hold: raw rows leave after ``telemetry_raw_days``
and the hourly rollups made from them stay, with the figures the raw rows
gave; PostgreSQL's day partitions are made ahead and dropped whole; a
heartbeat from a clock far off is refused at ingest, and one that reaches
the default partition anyway is pruned like the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

import protocol as p
from controlplane.config import ControlPlaneSettings
from controlplane.db import (
    DeviceEvent,
    TelemetryHourly,
    TelemetryRow,
    make_engine,
    upgrade_to_head,
)
from controlplane.db.telemetry_aggregates import device_metrics
from controlplane.db.writes import BatchStore, IngestItem
from controlplane.ingest.decode import ClockSkew, decode_device_message
from controlplane.liveness import mark_silent_devices_offline
from controlplane.retention import RetentionJob
from controlplane.retention import partitions as parts
from controlplane.retention.prune import delete_through, last_id_before
from tests.support.controlplane import hello, telemetry
from tests.support.migrated import KINDS, migrated_engine

DAY = 86400.0
DEVICES = ("ret-a", "ret-b")


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database of each kind."""
    yield from migrated_engine(request, tmp_path)


def _settings(tmp_path: Path, engine: Engine, **extra: object) -> ControlPlaneSettings:
    return ControlPlaneSettings(data_dir=tmp_path, database_url=str(engine.url), **extra)


def _event(device: str, seq: int, at: float) -> p.Event:
    return p.Event(device_id=device, ts=at, seq=seq, type=p.EventType.DOWNLOADING)


def _beat(device: str, seq: int, at: float, latency: float,
          received_at: float | None = None) -> IngestItem:
    stats = p.InferenceStats(model="smollm2", version="1.0.0", requests=seq % 3 + 1, errors=1,
                             tokens=50, latency_p95_ms=latency, ttft_p50_ms=latency / 10)
    return IngestItem(p.TopicKind.TELEMETRY,
                      telemetry(device, seq, ts=at, cpu_percent=float(seq % 90),
                                inference=[stats]), at if received_at is None else received_at,
                      False)


def _count(engine: Engine, table: type) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def _write_day(store: BatchStore, start: float, first_seq: int) -> int:
    """Four heartbeats a device, six hours apart, from ``start``; returns the next seq."""
    seq = first_seq
    for hour in range(0, 24, 6):
        store.write([_beat(d, seq, start + hour * 3600 + i, 100.0 + seq)
                     for i, d in enumerate(DEVICES)])
        seq += 1
    return seq


def test_raw_rows_leave_after_their_period_while_rollups_stay(engine: Engine,
                                                              tmp_path: Path) -> None:
    settings = _settings(tmp_path, engine, telemetry_raw_days=3, telemetry_rollup_days=5,
                         telemetry_partitions_ahead_days=2)
    now = [time.time() // DAY * DAY + 600]
    job = RetentionJob(engine, settings, clock=lambda: now[0])
    store = BatchStore(engine)
    start = now[0]
    seq = 1
    # Day 0 alone: what the figures are before anything is pruned.
    job()
    seq = _write_day(store, start, seq)
    with Session(engine) as session:
        before = device_metrics(session, "ret-a", since=None)[0]
    for day in range(1, 7):  # a simulated week, the job running each day before the beats
        now[0] = start + day * DAY
        job()
        seq = _write_day(store, start + day * DAY, seq)
    now[0] = start + 7 * DAY + 120
    report = job()

    with engine.connect() as conn:
        oldest = conn.execute(select(func.min(TelemetryRow.ts))).scalar()
        hours = conn.execute(select(func.min(TelemetryHourly.hour))).scalar()
        day0 = conn.execute(
            select(TelemetryHourly.requests, TelemetryHourly.errors, TelemetryHourly.heartbeats,
                   TelemetryHourly.latency_p95_ms_wsum, TelemetryHourly.latency_p95_ms_weight)
            .where(TelemetryHourly.device_id == "ret-a", TelemetryHourly.model == "smollm2",
                   TelemetryHourly.hour < start + DAY)).all()
    # raw: only the last 3 days' heartbeats are left; SQLite deletes to the second
    # (day 4's first beats went), PostgreSQL drops whole days (day 4 is kept whole)
    if engine.dialect.name == "sqlite":
        assert oldest >= now[0] - 3 * DAY
        assert _count(engine, TelemetryRow) == (3 * 4 - 1) * len(DEVICES)
    else:
        assert oldest >= start + 4 * DAY
        assert _count(engine, TelemetryRow) == 3 * 4 * len(DEVICES)
    # rollups: 5 days kept, day 0 (7 days old) gone, day 2 (5 days old) still there
    assert start + DAY <= hours < start + 3 * DAY
    assert report.rolled_up > 0 and report.rollups_deleted > 0
    assert day0 == []  # pruned by the rollups' own period
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            days = parts.day_partitions(conn)
        assert report.partitions_dropped >= 1
        # nothing older than the raw period, and days made ahead of the clock
        assert min(days.values()) >= now[0] - 4 * DAY
        assert max(days.values()) >= now[0] - now[0] % DAY + 2 * DAY
    # The rollups of day 0 said what the raw rows said, while both were there.
    assert before.requests > 0


def test_rollups_give_the_figures_the_raw_rows_gave(engine: Engine, tmp_path: Path) -> None:
    settings = _settings(tmp_path, engine)
    start = time.time() // DAY * DAY - 2 * DAY
    now = [start + 2 * DAY + 600]
    store = BatchStore(engine)
    _write_day(store, start, 1)
    with Session(engine) as session:
        raw = device_metrics(session, "ret-b", since=None)[0]
    RetentionJob(engine, settings, clock=lambda: now[0])()
    with engine.connect() as conn:
        rows = conn.execute(select(TelemetryHourly).where(
            TelemetryHourly.device_id == "ret-b", TelemetryHourly.model == "smollm2")).all()
        resources = conn.execute(select(TelemetryHourly).where(
            TelemetryHourly.device_id == "ret-b", TelemetryHourly.model == "")).all()
    assert sum(r.requests for r in rows) == raw.requests
    assert sum(r.errors for r in rows) == raw.errors
    assert sum(r.heartbeats for r in rows) == raw.heartbeats == 4
    latency = sum(r.latency_p95_ms_wsum for r in rows) / sum(r.latency_p95_ms_weight for r in rows)
    assert latency == pytest.approx(raw.latency_p95_ms)
    assert {r.hour for r in resources} == {start + h * 3600 for h in range(0, 24, 6)}
    assert max(r.cpu_percent_max for r in resources) == 4.0  # seqs 1-4, cpu = seq % 90
    # A second run folds nothing twice.
    RetentionJob(engine, settings, clock=lambda: now[0])()
    with engine.connect() as conn:
        again = conn.execute(select(func.sum(TelemetryHourly.requests)).where(
            TelemetryHourly.device_id == "ret-b", TelemetryHourly.model == "smollm2")).scalar()
    assert again == raw.requests


def test_heartbeats_not_yet_rolled_up_are_kept(engine: Engine, tmp_path: Path) -> None:
    settings = _settings(tmp_path, engine, telemetry_raw_days=1, telemetry_rollup_days=1)
    now = time.time()
    old = now // DAY * DAY - 3 * DAY
    # stamped 3 days ago by their devices, received just now: too fresh to fold in
    # (SETTLE_S), so they stay although their ts is past the raw period
    BatchStore(engine).write([_beat(d, 1, old + i, 5.0, received_at=now)
                              for i, d in enumerate(DEVICES)])
    report = RetentionJob(engine, settings, clock=lambda: now + 10)()
    assert report.raw_deleted == 0 and report.rolled_up == 0
    assert _count(engine, TelemetryRow) == 2


def test_events_have_their_own_period(engine: Engine, tmp_path: Path) -> None:
    settings = _settings(tmp_path, engine, events_days=2, audit_window_days=1,
                         telemetry_raw_days=30,
                         telemetry_rollup_days=30)
    start = time.time() - 10 * DAY
    store = BatchStore(engine)
    for day in range(10):
        at = start + day * DAY
        store.write([IngestItem(p.TopicKind.EVENTS, _event("ret-a", day + 1, at), at, False)])
    RetentionJob(engine, settings, clock=lambda: start + 10 * DAY)()
    with engine.connect() as conn:
        kept = conn.execute(select(DeviceEvent.seq).order_by(DeviceEvent.seq)).scalars().all()
    assert kept == [9, 10]


def test_far_off_clock_is_refused_at_ingest() -> None:
    now = time.time()
    topic = p.device_topic("ret-a", p.TopicKind.TELEMETRY)
    ok = p.encode(telemetry("ret-a", 1, ts=now - 600))
    off = p.encode(telemetry("ret-a", 2, ts=now + 3 * DAY))
    assert decode_device_message(topic, ok, False, now, max_skew_s=DAY).message.seq == 1
    with pytest.raises(ClockSkew) as refused:
        decode_device_message(topic, off, False, now, max_skew_s=DAY)
    assert refused.value.reason == "clock_skew"
    # what the ingest still writes: the device was heard, online, at arrival
    heard = refused.value.heard
    assert isinstance(heard.message, p.State) and heard.message.state is p.DeviceState.ONLINE
    assert heard.received_at == now and not heard.retained
    # events may be old (an agent spools them while offline): not bounded
    old = p.encode(_event("ret-a", 3, now - 30 * DAY))
    assert decode_device_message(p.device_topic("ret-a", p.TopicKind.EVENTS), old, False, now,
                                 max_skew_s=DAY).message.seq == 3


def test_postgresql_default_partition_holds_the_rest_and_is_pruned(postgres_url: str,
                                                                  tmp_path: Path) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade_to_head(engine)
        settings = _settings(tmp_path, engine, telemetry_raw_days=2, telemetry_rollup_days=60)
        store = BatchStore(engine)
        far = time.time() // DAY * DAY - 40 * DAY  # no day partition that far back
        store.write([_beat("ret-a", 1, far + 60, 100.0)])
        store.write([_beat("ret-a", 1, far + 60, 100.0)])  # redelivered: stored once
        with engine.connect() as conn:
            in_default = conn.execute(text(f"SELECT count(*) FROM {parts.DEFAULT}")).scalar()
        assert in_default == 1
        # A day partition made later takes its rows out of the default one.
        with engine.begin() as conn:
            parts.create_day(conn, far)
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {parts.DEFAULT}")).scalar() == 0
            assert conn.execute(text(f"SELECT count(*) FROM {parts.day_name(far)}")).scalar() == 1
        store.write([_beat("ret-a", 2, far + DAY + 60, 100.0)])  # the day after: default again
        report = RetentionJob(engine, settings, clock=time.time)()
        assert report.partitions_dropped == 1 and report.raw_deleted == 1
        assert _count(engine, TelemetryRow) == 0
        assert _count(engine, TelemetryHourly) == 4  # two hours: resources + one version each
    finally:
        engine.dispose()


def test_offline_detection_reads_the_last_seen_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    upgrade_to_head(engine)
    store = BatchStore(engine)
    now = time.time()
    store.write([IngestItem(p.TopicKind.HELLO, hello("quiet"), now - 500, False),
                 IngestItem(p.TopicKind.HELLO, hello("chatty"), now - 500, False),
                 IngestItem(p.TopicKind.HELLO, hello("replayed"), now - 500, True)])
    store.write([IngestItem(p.TopicKind.TELEMETRY, telemetry("chatty", 1), now - 5, False)])
    with engine.begin() as conn:  # a retained replay counts as online, never heard live
        conn.execute(text("UPDATE devices SET online = 1 WHERE id = 'replayed'"))
        plan = " ".join(str(r) for r in conn.execute(text(
            "EXPLAIN QUERY PLAN UPDATE devices SET online = 0 "
            "WHERE devices.online = 1 AND devices.last_seen < 1")).all())
    assert "ix_devices_online_last_seen" in plan
    assert mark_silent_devices_offline(engine, now, 90) == 2
    with engine.connect() as conn:
        online = dict(conn.execute(text("SELECT id, online FROM devices")).all())
    assert online == {"quiet": 0, "chatty": 1, "replayed": 0}
    engine.dispose()


def test_batched_deletes_leave_the_ingest_writing(tmp_path: Path) -> None:
    """SQLite: pruning 40,000 rows in batches never holds the write lock for long."""
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    upgrade_to_head(engine)
    store = BatchStore(engine)
    old = time.time() - 30 * DAY
    for start in range(0, 40_000, 2_000):
        store.write([_beat(f"old-{i % 100}", start + i, old + start + i, 1.0)
                     for i in range(2_000)])
    last = last_id_before(engine, TelemetryRow.__table__, "received_at", old + 50_000)
    assert last == 40_000
    waits: list[float] = []
    done = threading.Event()

    def ingest() -> None:
        seq = 1
        while not done.is_set():
            t0 = time.monotonic()
            store.write([_beat("live", seq, time.time(), 1.0)])
            waits.append(time.monotonic() - t0)
            seq += 1
            time.sleep(0.005)

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        deleted = delete_through(engine, TelemetryRow.__table__, last, batch=2_000,
                                 deadline=time.monotonic() + 120)
    finally:
        done.set()
        writer.join()
    assert deleted == 40_000
    assert len(waits) >= 10  # the ingest wrote while the pruning ran
    assert max(waits) < 2.0, f"a write waited {max(waits):.2f} s for the pruner"
    engine.dispose()
