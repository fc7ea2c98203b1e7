"""Device counts kept as rows are written, and the indexes of history retention.

- ``device_counts``: devices by tier, online state and assignment form,
  kept by triggers on ``devices`` (:mod:`controlplane.db.device_counts`)
  and filled here from the devices there are; ``/metrics`` reads it
  instead of counting ``devices`` at every scrape.
- ``ix_device_events_type_id``: the newest ``evaluated`` event, which keys
  ``/metrics``' cached evaluation scores.
- ``ix_assignments_ended_at``: entries that ended before a cutoff, which
  history retention deletes after ``history_days``.

Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controlplane.migrations.columns import big_id_column, big_integer, boolean, string
from controlplane.migrations.tables import create_table

revision: str = "0012"
down_revision: str | None = "0011"

# Frozen copies of what controlplane.db.device_counts makes today: a revision
# must go on creating what it created when it was released.
_KEY = "tier, online, assignment_form"
_INSERT = f"INSERT INTO device_counts ({_KEY}, n) VALUES "
_CHANGED = ("OLD.tier IS {d} NEW.tier OR OLD.online IS {d} NEW.online "
            "OR OLD.assignment_form IS {d} NEW.assignment_form")
_OLD = "(OLD.tier, OLD.online, OLD.assignment_form, -1)"
_NEW = "(NEW.tier, NEW.online, NEW.assignment_form, 1)"
_SQLITE = [
    f"CREATE TRIGGER device_counts_insert AFTER INSERT ON devices BEGIN {_INSERT}{_NEW}; END",
    f"CREATE TRIGGER device_counts_delete AFTER DELETE ON devices BEGIN {_INSERT}{_OLD}; END",
    f"CREATE TRIGGER device_counts_update AFTER UPDATE OF {_KEY} ON devices "
    f"WHEN {_CHANGED.format(d='NOT')} BEGIN {_INSERT}{_OLD}, {_NEW}; END",
]
_POSTGRESQL = [
    "CREATE FUNCTION device_counts_track() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"IF TG_OP <> 'INSERT' THEN {_INSERT}{_OLD}; END IF; "
    f"IF TG_OP <> 'DELETE' THEN {_INSERT}{_NEW}; END IF; RETURN NULL; END $$",
    "CREATE TRIGGER device_counts_insert_delete AFTER INSERT OR DELETE ON devices "
    "FOR EACH ROW EXECUTE FUNCTION device_counts_track()",
    f"CREATE TRIGGER device_counts_update AFTER UPDATE OF {_KEY} ON devices "
    f"FOR EACH ROW WHEN ({_CHANGED.format(d='DISTINCT FROM')}) "
    "EXECUTE FUNCTION device_counts_track()",
]


def upgrade() -> None:
    create_table("device_counts", big_id_column(), string("tier", 16, nullable=True),
                 boolean("online"), string("assignment_form", 8), big_integer("n"))
    dialect = op.get_bind().dialect.name
    # Filled and armed in one transaction with the migration, so no device
    # written in between is missed or counted twice.
    op.execute(f"INSERT INTO device_counts ({_KEY}, n) "
               f"SELECT {_KEY}, count(*) FROM devices GROUP BY {_KEY}")
    for statement in _POSTGRESQL if dialect == "postgresql" else _SQLITE:
        op.execute(sa.text(statement))
    op.create_index("ix_device_events_type_id", "device_events", ["type", "id"])
    op.create_index("ix_assignments_ended_at", "assignments", ["ended_at"])


def downgrade() -> None:
    op.drop_index("ix_assignments_ended_at", "assignments")
    op.drop_index("ix_device_events_type_id", "device_events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS device_counts_insert_delete ON devices")
        op.execute("DROP TRIGGER IF EXISTS device_counts_update ON devices")
        op.execute("DROP FUNCTION IF EXISTS device_counts_track()")
    else:
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS device_counts_{name}")
    op.drop_table("device_counts")
