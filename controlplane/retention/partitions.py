"""PostgreSQL: ``telemetry`` partitioned by day of ``ts``, old days dropped whole.

The table is ``PARTITION BY RANGE (ts)`` (the Alembic revision
``0007_telemetry_retention`` converts it): one partition per UTC day,
named ``telemetry_pYYYYMMDD``, created ``ahead_days`` days ahead, and a
``telemetry_default`` partition for any row no day partition holds. Its
unique index ``(device_id, ts, seq)`` includes the partition key, so
deduplication stays exact: a redelivered heartbeat has the same ``ts`` and
lands in the same partition, where the index refuses it.

``ts`` is the device's clock; the ingest refuses a heartbeat whose ``ts``
is further than ``ingest_max_clock_skew_s`` from the time it arrived
(counted as ``clock_skew``), so rows land in a day partition that exists
and the default partition stays near empty.

Dropping a day is ``DROP TABLE`` of its partition: no row-by-row delete,
no vacuum debt. A partition is dropped only once every row in it has been
folded into the hourly rollups.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy import Connection, text

DAY_S = 86400
PARENT = "telemetry"
DEFAULT = "telemetry_default"
_NAME = re.compile(r"^telemetry_p(\d{8})$")


def is_partitioned(conn: Connection) -> bool:
    """Whether ``telemetry`` is a partitioned table here (PostgreSQL after 0007)."""
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(text("SELECT relkind FROM pg_class WHERE relname = :t "
                             "AND relnamespace = current_schema()::regnamespace"),
                        {"t": PARENT}).scalar()
    return kind == "p"


def day_name(day_start: float) -> str:
    """The partition holding the UTC day that starts at ``day_start``."""
    return f"telemetry_p{datetime.fromtimestamp(day_start, UTC):%Y%m%d}"


def day_start(name: str) -> float | None:
    """The start (Unix seconds) of the day partition ``name``; None for another table."""
    found = _NAME.match(name)
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y%m%d").replace(tzinfo=UTC).timestamp()


def is_partition(name: str) -> bool:
    """Whether ``name`` is a partition of ``telemetry`` (a day's, or the default)."""
    return name == DEFAULT or _NAME.match(name) is not None


def day_partitions(conn: Connection) -> dict[str, float]:
    """Every day partition of ``telemetry``: name -> start of its day."""
    names = conn.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = :parent ::regclass"), {"parent": PARENT}).scalars()
    return {n: start for n in names if (start := day_start(n)) is not None}


def create_day(conn: Connection, start: float) -> str:
    """Create the partition of the day starting at ``start``, moving any rows of that
    day out of the default partition first (PostgreSQL refuses the new partition while
    the default holds rows that belong to it)."""
    name = day_name(start)
    end = start + DAY_S
    bounds = {"lo": start, "hi": end}
    conn.execute(text(
        f"CREATE TEMP TABLE moving ON COMMIT DROP AS SELECT * FROM {DEFAULT} "
        "WHERE ts >= :lo AND ts < :hi"), bounds)
    conn.execute(text(f"DELETE FROM {DEFAULT} WHERE ts >= :lo AND ts < :hi"), bounds)
    # Bounds are literals in DDL; both are whole seconds from our own clock.
    conn.execute(text(f"CREATE TABLE {name} PARTITION OF {PARENT} "
                      f"FOR VALUES FROM ({start:.0f}) TO ({end:.0f})"))
    conn.execute(text(f"INSERT INTO {PARENT} SELECT * FROM moving"))
    conn.execute(text("DROP TABLE moving"))
    return name


def ensure_days(conn: Connection, now: float, *, behind_days: int, ahead_days: int) -> list[str]:
    """Create the day partitions from ``behind_days`` before ``now`` to ``ahead_days`` after."""
    today = now - now % DAY_S
    have = set(day_partitions(conn).values())
    made = []
    for offset in range(-behind_days, ahead_days + 1):
        start = today + offset * DAY_S
        if start not in have:
            made.append(create_day(conn, start))
    return made


def droppable_days(conn: Connection, cutoff: float, rolled_up_to: float) -> list[str]:
    """Day partitions wholly before ``cutoff`` whose rows are all rolled up."""
    out = []
    for name, start in sorted(day_partitions(conn).items(), key=lambda kv: kv[1]):
        if start + DAY_S > cutoff:
            continue
        pending = conn.execute(text(f"SELECT 1 FROM {name} WHERE id > :mark LIMIT 1"),
                               {"mark": rolled_up_to}).first()
        if pending is None:
            out.append(name)
    return out


def drop_day(conn: Connection, name: str) -> None:
    """Detach and drop one day partition."""
    if day_start(name) is None:
        raise ValueError(f"not a day partition of telemetry: {name!r}")
    conn.execute(text(f"DROP TABLE {name}"))

