"""Devices counted by tier, online state and assignment form, kept as rows are written.

``/metrics`` reports how many devices there are per tier and online state
and per desired-state form. Counting them with a ``GROUP BY`` over
``devices`` at every scrape costs in proportion to the fleet; this table
holds the counts instead, so a scrape reads a handful of rows.

The database keeps it exact: triggers on ``devices`` (made by migration
0012, ``0012_device_counts_history_retention.py``) append a ``+1`` row for
the device's new ``(tier, online, assignment_form)`` and a ``-1`` row for
its old one on every insert, delete and change of those columns, whichever code wrote it
(the ingest writer, offline detection, a test, an operator's SQL). A
heartbeat that only moves ``last_seen`` changes none of them and adds
nothing. Appending rather than updating one row per key means two writers
never wait on, or deadlock over, the same counter row on PostgreSQL.

:func:`compact` folds the appended rows into one row per key (offline
detection calls it on every run), so the table stays as small as the
number of distinct keys plus the changes since the last run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, Boolean, Connection, String, Table, func, select, text
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, big_id

#: the columns of ``devices`` the counts are keyed by
KEY = ("tier", "online", "assignment_form")


class DeviceCount(Base):
    """``n`` devices (a signed change, until compacted) with this tier, state and form."""

    __tablename__ = "device_counts"

    id: Mapped[int] = big_id()
    tier: Mapped[str | None] = mapped_column(String(16))
    online: Mapped[bool] = mapped_column(Boolean)
    assignment_form: Mapped[str] = mapped_column(String(8))
    n: Mapped[int] = mapped_column(BigInteger)


counts: Table = DeviceCount.__table__  # type: ignore[assignment]

@dataclass
class FleetCounts:
    """What ``/metrics`` reports about the fleet's devices."""

    #: ``(tier, online) -> devices``, only combinations with devices
    by_tier_and_state: dict[tuple[str | None, bool], int] = field(default_factory=dict)
    #: ``assignment_form -> devices``
    by_form: dict[str, int] = field(default_factory=dict)


def read_counts(conn: Connection) -> FleetCounts:
    """The current counts: a sum over ``device_counts``, whatever the fleet's size."""
    rows = conn.execute(
        select(counts.c.tier, counts.c.online, counts.c.assignment_form, func.sum(counts.c.n))
        .group_by(counts.c.tier, counts.c.online, counts.c.assignment_form)
    ).all()
    by_state: dict[tuple[str | None, bool], int] = defaultdict(int)
    by_form: dict[str, int] = defaultdict(int)
    for tier, online, form, n in rows:
        if n:
            by_state[(tier, bool(online))] += int(n)
            by_form[form] += int(n)
    return FleetCounts(dict(by_state), dict(by_form))


def compact(conn: Connection) -> int:
    """Fold the appended rows into one per key; return how many rows it removed.

    The delete returns exactly the rows it removed and the sums go back as
    new rows in the same transaction, so a row appended meanwhile (not seen
    by the delete) is left for the next run, and two compactions at once
    never count a row twice.
    """
    rows_now = conn.execute(select(func.count()).select_from(counts)).scalar_one()
    keys_now = conn.execute(select(func.count()).select_from(
        select(*(counts.c[c] for c in KEY)).distinct().subquery())).scalar_one()
    if rows_now <= keys_now:
        return 0  # already one row per key: nothing to fold
    removed = conn.execute(
        counts.delete().returning(counts.c.tier, counts.c.online, counts.c.assignment_form,
                                  counts.c.n)
    ).all()
    sums: dict[tuple[str | None, bool, str], int] = defaultdict(int)
    for tier, online, form, n in removed:
        sums[(tier, bool(online), form)] += n
    rows = [{"tier": t, "online": o, "assignment_form": f, "n": n}
            for (t, o, f), n in sorted(sums.items(), key=lambda kv: repr(kv[0])) if n]
    if rows:
        conn.execute(counts.insert(), rows)
    return len(removed) - len(rows)


def trigger_names(conn: Connection) -> set[str]:
    """The counting triggers present on ``devices`` (for checks and tests)."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'devices'"
    else:
        sql = ("SELECT tgname FROM pg_trigger WHERE tgrelid = 'devices'::regclass "
               "AND NOT tgisinternal")
    return {name for (name,) in conn.execute(text(sql))}
