"""Replicas: the lease row control-plane replicas elect their leader with, and
telemetry made idempotent (unique on device, ts, seq) for redelivered messages.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    # A duplicate row from before this migration would block the unique index:
    # keep the first of each (device_id, ts, seq).
    op.execute(
        "DELETE FROM telemetry WHERE id NOT IN "
        "(SELECT MIN(id) FROM telemetry GROUP BY device_id, ts, seq)"
    )
    op.drop_index("ix_telemetry_device_id_ts", table_name="telemetry")
    op.create_index("uq_telemetry_device_id_ts_seq", "telemetry", ["device_id", "ts", "seq"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("uq_telemetry_device_id_ts_seq", table_name="telemetry")
    op.create_index("ix_telemetry_device_id_ts", "telemetry", ["device_id", "ts"])
    op.drop_table("leases")
