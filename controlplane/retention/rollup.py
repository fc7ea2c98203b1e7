"""Fold raw heartbeats into hourly rollups, in id order, from a stored mark.

Heartbeats are taken in pages by id after the mark ``telemetry_rollup``
(ids grow as rows are written, on SQLite and PostgreSQL alike), summed per
device, hour (of the heartbeat's own ``ts``) and model version by the
database itself (``INSERT ... SELECT ... GROUP BY``, the inference list
unnested with ``json_each`` or ``jsonb_array_elements``), and added to
``telemetry_hourly`` (``ON CONFLICT ... DO UPDATE``) in the same transaction
that moves the mark: a page is folded in exactly once.

Only rows received more than :data:`SETTLE_S` ago are read, so a batch a
replica is still committing (its ids drawn, its rows not yet visible) is
not stepped over.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine, Table, select, text
from sqlalchemy.dialects import postgresql, sqlite

from ..db.models import TelemetryRow
from ..db.retention_tables import SUMMED, WEIGHTED, RetentionMark, TelemetryHourly
from .prune import PAUSE_S

#: the mark's name in ``retention_marks``
ROLLUP_MARK = "telemetry_rollup"
#: heartbeats younger than this (by ``received_at``) wait for the next run
SETTLE_S = 60.0

telemetry: Table = TelemetryRow.__table__  # type: ignore[assignment]
hourly: Table = TelemetryHourly.__table__  # type: ignore[assignment]
marks: Table = RetentionMark.__table__  # type: ignore[assignment]

_KEY = ("device_id", "hour", "model", "version")
_MAXED = ("cpu_percent_max", "ram_used_bytes_max", "temp_c_max")


def read_mark(conn: Connection, name: str) -> float:
    """The stored value of mark ``name`` (0 before the first run)."""
    value = conn.execute(select(marks.c.value).where(marks.c.name == name)).scalar()
    return float(value or 0)


def rolled_up_to(conn: Connection) -> int:
    """The last heartbeat id folded into rollups.

    An integer: compared with ``id`` as a float, PostgreSQL would cast every
    id to ``double precision`` and scan each partition instead of its index.
    """
    return int(read_mark(conn, ROLLUP_MARK))


def write_mark(conn: Connection, name: str, value: float) -> None:
    """Store mark ``name`` (insert or update)."""
    stmt = _dialect_insert(conn)(marks).values(name=name, value=value)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}))


def _dialect_insert(conn: Connection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


_WEIGHTS = ", ".join(f"{n}_wsum, {n}_weight" for n in WEIGHTED)
_COLUMNS = ("device_id, hour, model, version, heartbeats, cpu_percent_sum, cpu_percent_max, "
            "ram_used_bytes_max, temp_c_max, requests, errors, tokens, crashes, ooms, "
            + _WEIGHTS)
_ZEROS = ", ".join("0, 0" for _ in WEIGHTED)
#: per dialect: the hour of ``ts``, a field of one inference entry ``e`` as text,
#: the inference list's entries, the larger of two values
_DIALECT = {
    "sqlite": {"hour": "CAST(t.ts / 3600 AS INTEGER) * 3600",
               "field": "json_extract(e.value, '$.{name}')",
               "entries": "json_each(t.inference) AS e", "greater": "max"},
    "postgresql": {"hour": "floor(t.ts / 3600) * 3600",
                   "field": "(e ->> '{name}')::float8",
                   # jsonb: parsed once a row; ->> on json parses the entry again
                   # for each of its twenty-odd fields
                   "entries": "jsonb_array_elements(t.inference::jsonb) AS e",
                   "greater": "greatest"},
}


def _statements(dialect: str) -> tuple[str, str]:
    """The two ``INSERT ... SELECT ... GROUP BY ... ON CONFLICT`` of one id range:
    the devices' resource figures, and their inference figures per model version.

    The database folds the rows (in C, no row crosses into Python); the sums
    and weights are those of :mod:`controlplane.db.telemetry_aggregates`.
    """
    d = _DIALECT[dialect]
    hour, greater = d["hour"], d["greater"]

    def field(name: str) -> str:
        return d["field"].format(name=name)

    text_field = d["field"].replace("::float8", "")
    weight = f"{greater}(coalesce({field('requests')}, 0), 1)"
    weighted = ", ".join(
        f"coalesce(sum({field(n)} * {weight}), 0), "
        f"coalesce(sum(CASE WHEN {field(n)} IS NOT NULL THEN {weight} ELSE 0 END), 0)"
        for n in WEIGHTED)
    summed = ", ".join(f"coalesce(sum({field(n)}), 0)" for n in SUMMED)
    summed_cols = [c for c in _COLUMNS.split(", ") if c not in (*_KEY, *_MAXED)]
    update = ", ".join([f"{c} = telemetry_hourly.{c} + excluded.{c}" for c in summed_cols]
                       + [f"{c} = {greater}(coalesce(telemetry_hourly.{c}, excluded.{c}), "
                          f"coalesce(excluded.{c}, telemetry_hourly.{c}))" for c in _MAXED])
    upsert = f"ON CONFLICT (device_id, hour, model, version) DO UPDATE SET {update}"
    resources = (
        f"INSERT INTO telemetry_hourly ({_COLUMNS}) "
        f"SELECT t.device_id, {hour} AS h, '', '', count(*), sum(t.cpu_percent), "
        f"max(t.cpu_percent), max(t.ram_used_bytes), max(t.temp_c), 0, 0, 0, 0, 0, {_ZEROS} "
        "FROM telemetry AS t WHERE t.id > :lo AND t.id <= :hi "
        f"GROUP BY t.device_id, h {upsert}")
    model = text_field.format(name="model")
    version = text_field.format(name="version")
    inference = (
        f"INSERT INTO telemetry_hourly ({_COLUMNS}) "
        f"SELECT t.device_id, {hour} AS h, {model} AS m, {version} AS v, count(*), "
        f"0, 0, 0, NULL, {summed}, {weighted} "
        f"FROM telemetry AS t, {d['entries']} "
        f"WHERE t.id > :lo AND t.id <= :hi AND {model} IS NOT NULL AND {version} IS NOT NULL "
        f"GROUP BY t.device_id, h, m, v {upsert}")
    return resources, inference


def roll_up(engine: Engine, now: float, *, page: int, deadline: float) -> int:
    """Fold settled heartbeats in, a page of ids at a time, until caught up or
    ``deadline`` (monotonic); return how many were folded."""
    settled = now - SETTLE_S
    resources, inference = (text(sql) for sql in _statements(engine.dialect.name))
    done = 0
    while time.monotonic() < deadline:
        with engine.begin() as conn:
            mark = rolled_up_to(conn)
            rows = conn.execute(
                select(telemetry.c.id, telemetry.c.received_at)
                .where(telemetry.c.id > mark).order_by(telemetry.c.id).limit(page)
            ).all()
            ready = 0
            for row in rows:
                if row.received_at >= settled:
                    break
                ready += 1
            if not ready:
                return done
            bounds = {"lo": mark, "hi": rows[ready - 1].id}
            conn.execute(resources, bounds)
            conn.execute(inference, bounds)
            write_mark(conn, ROLLUP_MARK, bounds["hi"])
        done += ready
        if ready < page:
            return done
        time.sleep(PAUSE_S)  # the ingest's turn at the write lock between two pages
    return done
