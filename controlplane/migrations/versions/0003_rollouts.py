"""Rollouts: specs, stages, per-device membership, gate evaluations, decisions.

Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import (
    big_id_reference,
    device_id,
    double,
    integer,
    json,
    string,
)
from controlplane.migrations.tables import create_id_table, create_index, create_table, drop_index

revision: str = "0003"
down_revision: str | None = "0002"

#: a rollout's rows go with it
ROLLOUT = ("rollout_id", "rollouts.id", "CASCADE")


def upgrade() -> None:
    create_table(
        "rollouts",
        string("id", 32),
        string("model_name", 64),
        string("version", 64),
        big_id_reference("version_id"),
        json("spec"),
        string("state", 24),
        integer("stage_index"),
        double("stage_started_at", nullable=True),
        integer("approved_stage"),
        integer("revision"),
        double("created_at"),
        double("updated_at"),
        string("reason", 1024, nullable=True),
        json("last_gates", nullable=True),
        references=[("version_id", "model_versions.id", "RESTRICT")],
    )
    create_index("rollouts", "model_name")
    create_index("rollouts", "state")

    create_id_table(
        "rollout_decisions",
        string("rollout_id", 32),
        double("ts"),
        string("kind", 32),
        integer("stage_index", nullable=True),
        string("actor", 16),
        string("reason", 2048),
        json("details", nullable=True),
        references=[ROLLOUT],
    )
    create_index("rollout_decisions", "rollout_id", "id")

    create_table(
        "rollout_devices",
        string("rollout_id", 32),
        device_id(),
        string("device_tier", 16, nullable=True),
        string("variant_tier", 16, nullable=True),
        string("cohort_key", 64),
        string("state", 16),
        integer("stage_index", nullable=True),
        string("assignment_id", 128, nullable=True),
        double("assigned_at", nullable=True),
        string("previous_ref", 128, nullable=True),
        string("health", 16, nullable=True),
        string("reason", 1024, nullable=True),
        double("updated_at"),
        primary_key=("rollout_id", "device_id"),
        references=[("device_id", "devices.id", "CASCADE"), ROLLOUT],
    )
    create_index("rollout_devices", "device_id")
    create_index("rollout_devices", "rollout_id", "state")


def downgrade() -> None:
    drop_index("rollout_devices", "rollout_id", "state")
    drop_index("rollout_devices", "device_id")
    op.drop_table("rollout_devices")
    drop_index("rollout_decisions", "rollout_id", "id")
    op.drop_table("rollout_decisions")
    drop_index("rollouts", "state")
    drop_index("rollouts", "model_name")
    op.drop_table("rollouts")
