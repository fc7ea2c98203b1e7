"""Model sets: a device's assignments are one per model name, its document one per device.

- ``assignments`` gains ``model_name``, filled from each row's release;
  ``(device_id, model_name, sequence)`` replaces ``(device_id, sequence)``
  as the unique key (a document's entries share its sequence), and a
  partial unique index allows one ``active`` row per device and name.
  ``envelope`` becomes optional: the signed document moves to
  ``desired_documents``.
- ``desired_documents`` holds each device's current signed document
  (``envelope``), its ``expires_at`` (what the re-sign job looks for) and
  its ``form``, filled from each device's active assignment.
- ``devices`` gains ``assignment_form`` (``single`` until the device says
  hello/2), ``models`` (every active model by name, filled from
  ``active_model``) and ``model_updates``.

Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controlplane.migrations.columns import device_id, double, json, string, text
from controlplane.migrations.tables import create_index, create_table, drop_index

revision: str = "0007"
down_revision: str | None = "0006"

_ACTIVE = sa.text("status = 'active'")
_ACTIVE_INDEX = "uq_assignments_active_device_id_model_name"


def upgrade() -> None:
    conn = op.get_bind()
    op.add_column("assignments", string("model_name", 64, nullable=True))
    assignments = sa.table(
        "assignments", sa.column("id"), sa.column("device_id"), sa.column("version_id"),
        sa.column("model_name"), sa.column("status"), sa.column("envelope"),
        sa.column("expires_at"),
    )
    versions = sa.table("model_versions", sa.column("id"), sa.column("model_name"))
    conn.execute(sa.update(assignments).values(model_name=(
        sa.select(versions.c.model_name).where(versions.c.id == assignments.c.version_id)
        .scalar_subquery()
    )))
    with op.batch_alter_table("assignments") as batch:
        batch.alter_column("model_name", existing_type=sa.String(64), nullable=False)
        batch.alter_column("envelope", existing_type=sa.Text(), nullable=True)
        batch.drop_constraint("uq_assignments_device_id_sequence", type_="unique")
        batch.create_unique_constraint(
            "uq_assignments_device_id_model_name_sequence",
            ["device_id", "model_name", "sequence"])
    op.create_index(_ACTIVE_INDEX, "assignments", ["device_id", "model_name"], unique=True,
                    sqlite_where=_ACTIVE, postgresql_where=_ACTIVE)

    create_table(
        "desired_documents",
        device_id(),
        text("envelope", nullable=True),
        double("expires_at", nullable=True),
        string("form", 8, nullable=True),
        primary_key=("device_id",),
    )
    create_index("desired_documents", "expires_at")
    documents = sa.table("desired_documents", sa.column("device_id"), sa.column("envelope"),
                         sa.column("expires_at"), sa.column("form"))
    conn.execute(sa.insert(documents).from_select(
        ["device_id", "envelope", "expires_at", "form"],
        sa.select(assignments.c.device_id, assignments.c.envelope, assignments.c.expires_at,
                  sa.literal("single")).where(assignments.c.status == "active"),
    ))

    op.add_column("devices", sa.Column("assignment_form", sa.String(8), nullable=False,
                                       server_default="single"))
    create_index("devices", "assignment_form")
    op.add_column("devices", json("models", nullable=True))
    op.add_column("devices", json("model_updates", nullable=True))
    devices = sa.table("devices", sa.column("id"), sa.column("active_model", sa.JSON),
                       sa.column("models", sa.JSON))
    filled = [
        {"b_id": row.id, "b_models": {row.active_model["name"]: row.active_model}}
        for row in conn.execute(
            sa.select(devices.c.id, devices.c.active_model)
            .where(devices.c.active_model.is_not(None))
        )
        if isinstance(row.active_model, dict) and row.active_model.get("name")
    ]
    if filled:
        conn.execute(
            sa.update(devices).where(devices.c.id == sa.bindparam("b_id"))
            .values(models=sa.bindparam("b_models", type_=sa.JSON)),
            filled,
        )


def downgrade() -> None:
    # Plain DROP COLUMN, not a batch copy: on SQLite copying ``devices`` would
    # drop the original, and its ON DELETE CASCADE would empty every per-device table.
    drop_index("devices", "assignment_form")
    for column in ("model_updates", "models", "assignment_form"):
        op.drop_column("devices", column)
    op.drop_table("desired_documents")
    op.drop_index(_ACTIVE_INDEX, table_name="assignments")
    conn = op.get_bind()
    # The old key allows one row per device and sequence: keep each document's
    # first entry (a set's other entries have no place in the old form).
    conn.execute(sa.text(
        "DELETE FROM assignments WHERE id NOT IN "
        "(SELECT min(id) FROM assignments GROUP BY device_id, sequence)"
    ))
    conn.execute(sa.text("UPDATE assignments SET envelope = '' WHERE envelope IS NULL"))
    with op.batch_alter_table("assignments") as batch:
        batch.drop_constraint("uq_assignments_device_id_model_name_sequence", type_="unique")
        batch.create_unique_constraint("uq_assignments_device_id_sequence",
                                       ["device_id", "sequence"])
        batch.alter_column("envelope", existing_type=sa.Text(), nullable=False)
        batch.drop_column("model_name")
