"""Database size over a simulated week with retention on, and the ingest's write rate
while retention prunes.

    .venv/bin/python bench/retention.py                  # SQLite
    RETENTION_DB=postgresql .venv/bin/python bench/retention.py
    .venv/bin/python bench/retention.py scrape           # /metrics' device counts (:func:`scrape`)

A controlled clock walks ``RETENTION_DAYS`` (8) days. Each day,
``RETENTION_DEVICES`` devices (30) send a heartbeat every
``RETENTION_HEARTBEAT_S`` (30 s: 2,880 a device-day, with one inference
entry each), written through the ingest's
own batch writer in batches of 500 as the ingest writes them; at the end of
each day the retention job runs (raw kept ``RAW_DAYS`` = 2 days, rollups
400) while the next day's first batches are written beside it, and the
database's size is read, less what the empty database took. Size is
linear in devices, so the figures are per device: bytes per device-day of
raw telemetry (``telemetry`` with its indexes after day 1, before anything
is pruned), of rollups, the database's size per device once retention holds
it steady, and what the settings predict for that (raw days plus the day
being written and one retention interval, times raw bytes per device-day,
plus the rollups). Raw bytes are one row per heartbeat, so a run at a
longer heartbeat is scaled to 30 s (``HEARTBEAT_S / 30``) for the week of
``FLEET`` (10,000) devices at 30 s it projects at the default settings. The
write rate is rows per second of the batches written while
the job ran, against those written with no job running.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import report
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import protocol as p  # noqa: E402
from controlplane.config import ControlPlaneSettings  # noqa: E402
from controlplane.db import make_engine, upgrade_to_head  # noqa: E402
from controlplane.db.device_counts import compact, read_counts  # noqa: E402
from controlplane.db.queries import (  # noqa: E402
    count_devices_by_form,
    count_devices_by_tier_and_state,
)
from controlplane.db.session import session_factory  # noqa: E402
from controlplane.db.writes import BatchStore, IngestItem  # noqa: E402
from controlplane.retention import RetentionJob  # noqa: E402
from tests.support.controlplane import hello, telemetry  # noqa: E402

DEVICES = int(os.environ.get("RETENTION_DEVICES", "30"))
DAYS = int(os.environ.get("RETENTION_DAYS", "8"))
DATABASE = os.environ.get("RETENTION_DB", "sqlite")
RAW_DAYS = 2
#: seconds between two heartbeats of a device; raw bytes per device-day are
#: also given as at 30 s (scaled by HEARTBEAT_S / 30: one row per heartbeat)
HEARTBEAT_S = int(os.environ.get("RETENTION_HEARTBEAT_S", "30"))
#: the fleet whose week the figures are projected to
FLEET = 10_000
WEEK_DAYS = 7
BATCH = 500
DAY_S = 86400
BEATS = DAY_S // HEARTBEAT_S
TIERS = ("micro", "small", "medium")


def db_bytes(engine: Engine, path: Path) -> int:
    """The SQLite file, or PostgreSQL's tables with their indexes and partitions.

    SQLite's write-ahead log is checkpointed into the file first: it holds
    pages on their way there, and its size follows the checkpoints, not
    the data.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return int(conn.execute(text(
                "SELECT sum(pg_total_relation_size(relid)) FROM pg_stat_user_tables")).scalar())
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def telemetry_bytes(engine: Engine) -> int:
    """Bytes of raw ``telemetry`` with its indexes (every partition on PostgreSQL)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return int(conn.execute(text(
                "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
                "WHERE inhparent = 'telemetry'::regclass")).scalar())
        return int(conn.execute(text(
            "SELECT sum(pgsize) FROM dbstat WHERE name IN "
            "(SELECT name FROM sqlite_master WHERE tbl_name = 'telemetry')")).scalar() or 0)


def rollup_bytes(engine: Engine) -> int:
    """Bytes of ``telemetry_hourly`` with its indexes."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return int(conn.execute(text(
                "SELECT pg_total_relation_size('telemetry_hourly')")).scalar())
        return int(conn.execute(text(
            "SELECT sum(pgsize) FROM dbstat WHERE name = 'telemetry_hourly' "
            "OR name LIKE '%telemetry_hourly_%'")).scalar() or 0)


def day_batches(start: float, first_seq: int) -> list[list[IngestItem]]:
    """One day of heartbeats of every device, in arrival order, cut in ingest batches."""
    items = []
    for beat in range(DAY_S // HEARTBEAT_S):
        for d in range(DEVICES):
            at = start + beat * HEARTBEAT_S + d * HEARTBEAT_S / DEVICES
            stats = p.InferenceStats(model="smollm2", version="1.0.0", requests=5, errors=0,
                                     tokens=320, ttft_p50_ms=40.0, ttft_p95_ms=70.0,
                                     latency_p50_ms=400.0, latency_p95_ms=650.0,
                                     tokens_per_s=80.0)
            beat_msg = p.Telemetry(device_id=f"ret-{d:05d}", ts=at, seq=first_seq + beat,
                                   uptime_s=float(beat * HEARTBEAT_S), cpu_percent=21.5,
                                   ram_used_bytes=1 << 30, temp_c=51.0,
                                   active_model="smollm2@1.0.0", inference=[stats])
            items.append(IngestItem(p.TopicKind.TELEMETRY, beat_msg, at, False))
    return [items[i:i + BATCH] for i in range(0, len(items), BATCH)]


def job_process(settings: dict[str, object], pipe: Connection) -> None:
    """Run the retention job at each clock value received; answer with its report."""
    config = ControlPlaneSettings.model_validate(settings)
    engine = make_engine(config.database_url)
    clock = [0.0]
    job = RetentionJob(engine, config, clock=lambda: clock[0])
    while True:
        try:
            clock[0] = pipe.recv()
        except EOFError:
            return
        pipe.send(job())


def write(store: BatchStore, batches: list[list[IngestItem]]) -> float:
    """Write ``batches``; rows per second."""
    t0 = time.perf_counter()
    for batch in batches:
        store.write(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def open_database(work: Path) -> tuple[str, Any]:
    """A fresh database of ``RETENTION_DB``'s kind: its URL, and the PostgreSQL cluster to stop."""
    if DATABASE == "postgresql":
        from tests.support.postgres import PostgresCluster

        postgres = PostgresCluster().start()
        return postgres.create_database("retention"), postgres
    return f"sqlite:///{work / 'cp.db'}", None


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scrape() -> None:
    """What ``/metrics`` reads for ``SCRAPE_DEVICES`` devices, and what the counts cost writes.

    A scrape's device counts read ``device_counts`` (a sum over a few rows)
    where they used to run a ``GROUP BY`` over ``devices``; both are timed
    on the same database. The counts' triggers add work only to writes that
    change a device's tier, state or form: heartbeats of online devices are
    timed with and without them (dropped for the comparison), and the hellos
    of new devices with them.
    """
    devices = int(os.environ.get("SCRAPE_DEVICES", "10000"))
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-scrape-"))
    url, postgres = open_database(work)
    engine = make_engine(url)
    try:
        upgrade_to_head(engine)
        store = BatchStore(engine)
        now = time.time()
        hellos = [IngestItem(p.TopicKind.HELLO, hello(f"s-{i:06d}", tier=TIERS[i % 3]), now,
                             False) for i in range(devices)]
        t0 = time.perf_counter()
        for i in range(0, devices, BATCH):
            store.write(hellos[i:i + BATCH])
        hello_rate = devices / (time.perf_counter() - t0)
        sessions = session_factory(engine)

        def group_by() -> None:
            with sessions() as session:
                count_devices_by_tier_and_state(session)
                count_devices_by_form(session)

        def counters() -> None:
            with engine.connect() as conn:
                read_counts(conn)

        with engine.begin() as conn:
            compact(conn)
        figures: dict[str, Any] = {
            "database": engine.dialect.name, "devices": devices,
            "group_by_ms": round(timed(group_by, 20) * 1000, 3),
            "device_counts_ms": round(timed(counters, 20) * 1000, 3),
            "hellos_per_s_with_counts": round(hello_rate)}
        for part, label in enumerate(("heartbeats_per_s_with_counts",
                                      "heartbeats_per_s_without")):
            rates = []
            for seq in range(10 * part + 1, 10 * part + 5):
                beats = [IngestItem(p.TopicKind.TELEMETRY, telemetry(f"s-{i:06d}", seq), now,
                                    False) for i in range(devices)]
                rates.append(write(store, [beats[i:i + BATCH]
                                           for i in range(0, devices, BATCH)]))
            figures[label] = round(statistics.median(rates[1:]))  # the first warms up
            with engine.begin() as conn:  # the second round runs without the triggers
                for name in ("insert", "delete", "update") if DATABASE == "sqlite" else (
                        "insert_delete ON devices", "update ON devices"):
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS device_counts_{name}")
    finally:
        engine.dispose()
        if postgres is not None:
            postgres.stop()
    report(figures)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-retention-"))
    path = work / "cp.db"
    url, postgres = open_database(work)
    engine = make_engine(url)
    try:
        upgrade_to_head(engine)
        settings = ControlPlaneSettings(data_dir=work, database_url=url,
                                        telemetry_raw_days=RAW_DAYS, telemetry_rollup_days=400)
        start = time.time() // DAY_S * DAY_S - DAYS * DAY_S
        clock = [start]
        jobs, theirs = mp.get_context("spawn").Pipe()
        worker = mp.get_context("spawn").Process(
            target=job_process, args=(settings.model_dump(mode="json"), theirs), daemon=True)
        worker.start()
        jobs.send(start)  # partitions of the first days, on PostgreSQL
        jobs.recv()
        # what an empty database takes (schema, catalog, the empty partitions ahead)
        empty = db_bytes(engine, path)
        store = BatchStore(engine)
        sizes, quiet, busy = [], [], []
        pending: list[list[IngestItem]] = []
        for day in range(DAYS):
            batches = pending or day_batches(start + day * DAY_S, day * BEATS + 1)
            quiet.append(write(store, batches))
            if day == 0:  # one whole day of raw heartbeats, before the job or the next day
                raw_per_device_day = telemetry_bytes(engine) / DEVICES
            clock[0] = start + (day + 1) * DAY_S + 120
            pending = day_batches(start + (day + 1) * DAY_S, (day + 1) * BEATS + 1)
            # The job, in a process of its own as in a control plane (its writer is
            # another process), with the next day's first batches written beside it.
            t0 = time.perf_counter()
            jobs.send(clock[0])
            rows, written = 0, 0
            while not jobs.poll() and written < len(pending):
                store.write(pending[written])
                rows += len(pending[written])
                written += 1
            busy_rate = rows / (time.perf_counter() - t0) if rows else 0.0
            result = jobs.recv()
            job_s = time.perf_counter() - t0
            if rows:
                busy.append(busy_rate)
            pending = pending[written:]
            sizes.append(db_bytes(engine, path) - empty)
            print(f"day {day + 1}: {quiet[-1]:,.0f} rows/s alone, {busy_rate:,.0f} rows/s beside "
                  f"the job ({job_s:.1f} s: {result}), database {sizes[-1] / 1e6:.1f} MB",
                  flush=True)
        rollup_per_device_day = rollup_bytes(engine) / DEVICES / DAYS
        steady = sizes[-1] / DEVICES
        raw_30s = raw_per_device_day * HEARTBEAT_S / 30
        # Raw held at most: the raw period, the day being written (a whole day
        # partition on PostgreSQL), and what arrives in one retention interval
        # before the run that prunes it: here a simulated day (SQLite's file
        # keeps that high-water mark; PostgreSQL's size is read after the drop).
        predicted = (RAW_DAYS + 2) * raw_per_device_day + DAYS * rollup_per_device_day
        figures = {
            "database": engine.dialect.name, "devices": DEVICES, "days": DAYS,
            "raw_days": RAW_DAYS, "heartbeat_s": HEARTBEAT_S,
            "raw_bytes_per_device_day": round(raw_per_device_day),
            "db_bytes_per_device_after_days": round(steady),
            # raw_days whole days plus the day being written, the rollups on top
            "rollup_bytes_per_device_day": round(rollup_per_device_day),
            "predicted_bytes_per_device": round(predicted),
            "measured_over_predicted": round(steady / predicted, 3),
            "raw_bytes_per_device_day_at_30s": round(raw_30s),
            # 10,000 devices at 30 s for a week at the defaults: raw kept 7 days,
            # the day being written, retention every 300 s
            "fleet_week_bytes_predicted_at_30s": round(FLEET * (
                (8 + 300 / DAY_S) * raw_30s + WEEK_DAYS * rollup_per_device_day)),
            "db_bytes_per_device_by_day": [round(s / DEVICES) for s in sizes],
            "write_rows_per_s_alone": round(statistics.median(quiet)),
            "write_rows_per_s_beside_retention": round(statistics.median(busy)) if busy else -1,
        }
        jobs.close()
        worker.join(30)
    finally:
        engine.dispose()
        if postgres is not None:
            postgres.stop()
    report(figures)


if __name__ == "__main__":
    scrape() if sys.argv[1:] == ["scrape"] else main()
