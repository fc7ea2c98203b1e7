"""Column types and constraints the migration revisions share.

A revision must go on creating exactly what it created when it was released
(``tests/test_migrations.py`` compares the migrated schema with the models):
never change what a helper here produces once a revision uses it; add a new
helper instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# 64-bit ids on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def big_id_column() -> sa.Column:
    """The autoincrementing 64-bit ``id`` primary-key column."""
    return sa.Column("id", BIG_ID, autoincrement=True, nullable=False)


def foreign_key(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    """``table.column`` referencing ``target`` (``"other_table.column"``).

    Named as the models' naming convention names it,
    ``fk_<table>_<column>_<other_table>``, so autogenerate sees no difference.
    """
    target_table = target.split(".", 1)[0]
    return sa.ForeignKeyConstraint(
        [column],
        [target],
        name=op.f(f"fk_{table}_{column}_{target_table}"),
        ondelete=ondelete,
    )
