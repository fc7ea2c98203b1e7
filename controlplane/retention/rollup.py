"""Fold raw heartbeats into hourly rollups, in id order, from a stored mark.

Heartbeats are read in pages by id after the mark ``telemetry_rollup``
(ids grow as rows are written, on SQLite and PostgreSQL alike), summed per
device, hour (of the heartbeat's own ``ts``) and model version in Python,
and added to ``telemetry_hourly`` with one upsert per page, in the same
transaction that moves the mark: a page is folded in exactly once.

Only rows received more than :data:`SETTLE_S` ago are read, so a batch a
replica is still committing (its ids drawn, its rows not yet visible) is
not stepped over.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

from ..db.models import TelemetryRow
from ..db.retention_tables import SUMMED, WEIGHTED, RetentionMark, TelemetryHourly

#: the mark's name in ``retention_marks``
ROLLUP_MARK = "telemetry_rollup"
#: heartbeats younger than this (by ``received_at``) wait for the next run
SETTLE_S = 60.0
HOUR_S = 3600.0

telemetry: Table = TelemetryRow.__table__  # type: ignore[assignment]
hourly: Table = TelemetryHourly.__table__  # type: ignore[assignment]
marks: Table = RetentionMark.__table__  # type: ignore[assignment]

_KEY = ("device_id", "hour", "model", "version")
_MAXED = ("cpu_percent_max", "ram_used_bytes_max", "temp_c_max")


def read_mark(conn: Connection, name: str) -> float:
    """The stored value of mark ``name`` (0 before the first run)."""
    value = conn.execute(select(marks.c.value).where(marks.c.name == name)).scalar()
    return float(value or 0)


def write_mark(conn: Connection, name: str, value: float) -> None:
    """Store mark ``name`` (insert or update)."""
    stmt = _dialect_insert(conn)(marks).values(name=name, value=value)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}))


def _dialect_insert(conn: Connection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def _empty(device_id: str, hour: float, model: str, version: str) -> dict[str, Any]:
    row: dict[str, Any] = {"device_id": device_id, "hour": hour, "model": model,
                           "version": version, "heartbeats": 0, "cpu_percent_sum": 0.0,
                           "cpu_percent_max": 0.0, "ram_used_bytes_max": 0, "temp_c_max": None}
    row |= dict.fromkeys(SUMMED, 0)
    for name in WEIGHTED:
        row[f"{name}_wsum"] = 0.0
        row[f"{name}_weight"] = 0.0
    return row


def fold(rows: list[Any]) -> list[dict[str, Any]]:
    """Sum heartbeats ``(device_id, ts, cpu, ram, temp, inference)`` into rollup rows."""
    out: dict[tuple[str, float, str, str], dict[str, Any]] = {}
    for device_id, ts, cpu, ram, temp, inference in rows:
        hour = ts - ts % HOUR_S
        key = (device_id, hour, "", "")
        res = out.get(key) or out.setdefault(key, _empty(*key))
        res["heartbeats"] += 1
        res["cpu_percent_sum"] += cpu
        res["cpu_percent_max"] = max(res["cpu_percent_max"], cpu)
        res["ram_used_bytes_max"] = max(res["ram_used_bytes_max"], ram)
        if temp is not None:
            res["temp_c_max"] = temp if res["temp_c_max"] is None else max(res["temp_c_max"], temp)
        entries = json.loads(inference) if isinstance(inference, str) else inference
        for stats in entries or ():
            key = (device_id, hour, str(stats.get("model")), str(stats.get("version")))
            agg = out.get(key) or out.setdefault(key, _empty(*key))
            agg["heartbeats"] += 1
            for name in SUMMED:
                agg[name] += int(stats.get(name) or 0)
            # weighted as telemetry_aggregates weighs a heartbeat: by its requests, at least 1
            weight = max(int(stats.get("requests") or 0), 1)
            for name in WEIGHTED:
                if stats.get(name) is not None:
                    agg[f"{name}_wsum"] += float(stats[name]) * weight
                    agg[f"{name}_weight"] += weight
    return list(out.values())


def _upsert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` to the stored rollups: sums add up, maxima keep the larger."""
    stmt = _dialect_insert(conn)(hourly)
    new = stmt.excluded
    bigger = "greatest" if conn.dialect.name == "postgresql" else "max"

    def larger(name: str) -> Any:
        # NULL-safe on both: SQLite's max(a, NULL) is NULL
        a, b = hourly.c[name], new[name]
        return getattr(func, bigger)(func.coalesce(a, b), func.coalesce(b, a))

    summed = [c.name for c in hourly.columns
              if c.name not in (*_KEY, "id", *_MAXED)]
    update = {name: hourly.c[name] + new[name] for name in summed}
    update |= {name: larger(name) for name in _MAXED}
    for start in range(0, len(rows), 500):
        conn.execute(stmt.on_conflict_do_update(index_elements=list(_KEY), set_=update),
                     rows[start:start + 500])


def roll_up(engine: Engine, now: float, *, page: int, max_pages: int) -> int:
    """Fold up to ``max_pages`` pages of settled heartbeats in; return how many were read."""
    settled = now - SETTLE_S
    done = 0
    for _ in range(max_pages):
        with engine.begin() as conn:
            mark = read_mark(conn, ROLLUP_MARK)
            rows = conn.execute(
                select(telemetry.c.id, telemetry.c.received_at, telemetry.c.device_id,
                       telemetry.c.ts, telemetry.c.cpu_percent, telemetry.c.ram_used_bytes,
                       telemetry.c.temp_c, telemetry.c.inference)
                .where(telemetry.c.id > mark).order_by(telemetry.c.id).limit(page)
            ).all()
            ready = []
            for row in rows:
                if row.received_at >= settled:
                    break
                ready.append(row)
            if not ready:
                return done
            _upsert(conn, fold([tuple(r)[2:] for r in ready]))
            write_mark(conn, ROLLUP_MARK, ready[-1].id)
        done += len(ready)
        if len(ready) < page:
            return done
    return done
