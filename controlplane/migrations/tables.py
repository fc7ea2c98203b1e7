"""Tables, constraints and indexes the migration revisions share.

Frozen, as :mod:`.columns` is: a revision must go on creating exactly what
it created when it was released, so never change what a helper here
produces once a revision uses it; add a new helper instead.

Constraints and indexes are named as the models' naming convention names
them (``pk_<table>``, ``fk_<table>_<column>_<other_table>``,
``uq_<table>_<columns>``, ``ix_<table>_<columns>``), so autogenerate sees no
difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from .columns import big_id_column, device_id

#: a foreign key as ``(column, "other_table.column", ondelete)``
Reference = tuple[str, str, str]

#: a per-device row goes when its device row does
DEVICE: Reference = ("device_id", "devices.id", "CASCADE")


def foreign_key(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    """``table.column`` referencing ``target`` (``"other_table.column"``)."""
    target_table = target.split(".", 1)[0]
    return sa.ForeignKeyConstraint(
        [column],
        [target],
        name=op.f(f"fk_{table}_{column}_{target_table}"),
        ondelete=ondelete,
    )


def create_table(
    name: str,
    *columns: sa.Column,
    primary_key: Sequence[str] = ("id",),
    references: Sequence[Reference] = (),
    unique: Sequence[Sequence[str]] = (),
) -> None:
    """``CREATE TABLE name`` with ``columns`` and its named constraints.

    Constraints are made in the order the revisions have always listed
    them: foreign keys (as ``references`` orders them), the primary key,
    then the unique constraints.
    """
    op.create_table(
        name,
        *columns,
        *(foreign_key(name, column, target, ondelete) for column, target, ondelete in references),
        sa.PrimaryKeyConstraint(*primary_key, name=op.f(f"pk_{name}")),
        *(sa.UniqueConstraint(*cols, name=op.f(f"uq_{name}_{'_'.join(cols)}")) for cols in unique),
    )


def create_id_table(
    name: str,
    *columns: sa.Column,
    references: Sequence[Reference] = (),
    unique: Sequence[Sequence[str]] = (),
) -> None:
    """:func:`create_table` with :func:`big_id_column` first and as the primary key."""
    create_table(name, big_id_column(), *columns, references=references, unique=unique)


def create_device_table(
    name: str, *columns: sa.Column, unique: Sequence[Sequence[str]] = ()
) -> None:
    """:func:`create_id_table` of rows about one device: ``device_id`` second,
    referencing :data:`DEVICE`."""
    create_id_table(name, device_id(), *columns, references=[DEVICE], unique=unique)


def index_name(table: str, columns: Sequence[str]) -> str:
    """``ix_<table>_<columns>``, the name :func:`create_index` gives."""
    return f"ix_{table}_{'_'.join(columns)}"


def create_index(table: str, *columns: str) -> None:
    """``CREATE INDEX ix_<table>_<columns> ON table (columns)``."""
    op.create_index(op.f(index_name(table, columns)), table, list(columns))


def drop_index(table: str, *columns: str) -> None:
    """Drop the index :func:`create_index` made on ``table (columns)``."""
    op.drop_index(op.f(index_name(table, columns)), table_name=table)
