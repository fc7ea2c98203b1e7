"""Replicas: the lease row control-plane replicas elect their leader with, and
telemetry made idempotent (unique on device, ts, seq) for redelivered messages.

Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import double, integer, string
from controlplane.migrations.tables import create_index, create_table, drop_index

revision: str = "0005"
down_revision: str | None = "0004"


def upgrade() -> None:
    create_table(
        "leases",
        string("name", 64),
        string("holder", 128, nullable=True),
        double("expires_at"),
        integer("epoch"),
        primary_key=("name",),
    )
    # A duplicate row from before this migration would block the unique index:
    # keep the first of each (device_id, ts, seq).
    op.execute(
        "DELETE FROM telemetry WHERE id NOT IN "
        "(SELECT MIN(id) FROM telemetry GROUP BY device_id, ts, seq)"
    )
    drop_index("telemetry", "device_id", "ts")
    op.create_index("uq_telemetry_device_id_ts_seq", "telemetry", ["device_id", "ts", "seq"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("uq_telemetry_device_id_ts_seq", table_name="telemetry")
    create_index("telemetry", "device_id", "ts")
    op.drop_table("leases")
