"""Delete old rows in small batches, each its own short transaction.

Rows of ``telemetry``, ``device_events`` and ``telemetry_hourly`` are
written in time order, so their ids grow with their times: the last id
older than a cutoff is found by a binary search over ids (a few primary-key
lookups, no index on the time column), and rows are deleted in id ranges
of at most ``batch`` rows. Between batches the pruner sleeps, so an ingest
writer waiting for SQLite's write lock gets it within one batch's time.
Rows written out of time order (a replica's late batch) are at most a few
seconds out; a row left behind by that goes at the next run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import ColumnElement, Engine, Table, delete, func, select

#: pause between two batches: the ingest's turn at the write lock. SQLite's busy
#: handler sleeps up to 100 ms between its tries, so a shorter pause could pass
#: while a waiting writer sleeps, and the next batch would take the lock again
PAUSE_S = 0.1


def last_id_before(engine: Engine, table: Table, column: str, cutoff: float) -> int | None:
    """The largest id whose ``column`` is below ``cutoff``, assuming ids grow with it."""
    col, ids = table.c[column], table.c.id
    with engine.connect() as conn:
        lo, hi = conn.execute(select(func.min(ids), func.max(ids))).one()
        if lo is None:
            return None

        def first_at_or_after(at: int) -> tuple[int, float] | None:
            row = conn.execute(select(ids, col).where(ids >= at).order_by(ids).limit(1)).first()
            return (row[0], row[1]) if row else None

        first = first_at_or_after(lo)
        if first is None or first[1] >= cutoff:
            return None
        found = first[0]
        while lo <= hi:
            mid = (lo + hi) // 2
            row = first_at_or_after(mid)
            if row is None or row[1] >= cutoff:
                hi = mid - 1
            else:
                found = max(found, row[0])
                lo = row[0] + 1
        return found


def delete_through(engine: Engine, table: Table, last_id: int, *, batch: int,
                   deadline: float, clock: Callable[[], float] = time.monotonic) -> int:
    """Delete rows with ids up to ``last_id``, ``batch`` at a time, until ``deadline``."""
    ids = table.c.id
    deleted = 0
    while clock() < deadline:
        with engine.begin() as conn:
            low = conn.execute(select(func.min(ids))).scalar()
            if low is None or low > last_id:
                return deleted
            upper = min(low + batch - 1, last_id)
            deleted += conn.execute(delete(table).where(ids >= low, ids <= upper)).rowcount
        time.sleep(PAUSE_S)
    return deleted


def prune_older(engine: Engine, table: Table, column: str, cutoff: float, *, batch: int,
                deadline: float, not_after_id: float | None = None) -> int:
    """Delete ``table``'s rows whose ``column`` is below ``cutoff`` (ids up to
    ``not_after_id`` at most); return how many went."""
    last = last_id_before(engine, table, column, cutoff)
    if last is None:
        return 0
    if not_after_id is not None:
        last = min(last, int(not_after_id))
    return delete_through(engine, table, last, batch=batch, deadline=deadline)


def delete_matching(engine: Engine, table: Table, where: ColumnElement[bool], *, batch: int,
                    deadline: float, clock: Callable[[], float] = time.monotonic) -> int:
    """Delete ``table``'s rows matching ``where``, ``batch`` at a time, until ``deadline``.

    For rows whose ids do not follow their times (an assignment ends long
    after it was issued): each batch picks up to ``batch`` ids through
    ``where``'s own index and deletes them in a short transaction.
    """
    ids = table.c.id
    deleted = 0
    while clock() < deadline:
        with engine.begin() as conn:
            chunk = conn.execute(select(ids).where(where).order_by(ids).limit(batch)
                                 ).scalars().all()
            if chunk:
                deleted += conn.execute(delete(table).where(ids.in_(chunk))).rowcount
        if len(chunk) < batch:
            return deleted
        time.sleep(PAUSE_S)
    return deleted
