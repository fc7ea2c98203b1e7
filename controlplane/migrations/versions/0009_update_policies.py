"""Update policies: each assignment entry's signed policy, device defaults by label or
profile, and when a rollout stage's bake started.

``assignments.policy`` holds the effective policy signed into the entry
(windows, rate cap, metered links, an operator's lock override);
``update_policy_defaults`` holds the defaults a device label or firmware
profile carries; ``rollouts.bake_started_at`` is when the current stage had
enough activated devices for its bake to start.

Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import double, json, string
from controlplane.migrations.tables import create_id_table

revision: str = "0009"
down_revision: str | None = "0008"


def upgrade() -> None:
    op.add_column("assignments", json("policy", nullable=True))
    op.add_column("rollouts", double("bake_started_at", nullable=True))
    create_id_table(
        "update_policy_defaults",
        string("selector", 8),
        string("key", 128),
        string("value", 128),
        json("policy"),
        double("updated_at"),
        unique=[("selector", "key", "value")],
    )


def downgrade() -> None:
    op.drop_table("update_policy_defaults")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("bake_started_at")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("policy")
