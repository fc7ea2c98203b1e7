"""Columns the migration revisions share (their tables: :mod:`.tables`).

Frozen: a revision must go on creating exactly what it created when it was
released (``tests/test_migrations.py`` compares the migrated schema with the
models), so never change what a helper here produces once a revision uses
it; add a new helper instead.

A column made here is ``NOT NULL`` unless ``nullable=True`` says otherwise,
as every column the models declare without ``Optional`` is.
"""

from __future__ import annotations

from typing import Protocol

import sqlalchemy as sa

# 64-bit ids on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def big_id_column() -> sa.Column:
    """The autoincrementing 64-bit ``id`` primary-key column."""
    return sa.Column("id", BIG_ID, autoincrement=True, nullable=False)


def string(name: str, length: int, *, nullable: bool = False) -> sa.Column:
    """A ``VARCHAR(length)`` column."""
    return sa.Column(name, sa.String(length=length), nullable=nullable)


class ColumnKind(Protocol):
    """Makes a column of one SQL type: ``kind(name, nullable=...)``."""

    def __call__(self, name: str, *, nullable: bool = False) -> sa.Column:
        """The column ``name`` of this kind."""
        ...


def _kind(sql_type: type[sa.types.TypeEngine]) -> ColumnKind:
    def column(name: str, *, nullable: bool = False) -> sa.Column:
        return sa.Column(name, sql_type(), nullable=nullable)

    return column


#: unbounded ``TEXT``
text = _kind(sa.Text)
#: double precision: Unix times, durations, percentages
double = _kind(sa.Double)
#: 32-bit integer
integer = _kind(sa.Integer)
#: 64-bit integer: sizes, counters, sequence numbers
big_integer = _kind(sa.BigInteger)
#: boolean
boolean = _kind(sa.Boolean)
#: a JSON document
json = _kind(sa.JSON)


def device_id() -> sa.Column:
    """The ``device_id`` column of every per-device table (``devices.id``'s type)."""
    return string("device_id", 64)


def big_id_reference(name: str) -> sa.Column:
    """A column holding another table's :func:`big_id_column` value."""
    return sa.Column(name, BIG_ID, nullable=False)
