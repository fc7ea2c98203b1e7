"""Evaluation scores: an ``evaluated`` device event keeps the scores it carried.

The agent scores a candidate (and the version it would replace) on the
release's evaluation set and reports both in one ``evaluated`` event; the
``min_eval_ratio`` rollout gate reads them from this column. Events stored
before this revision have none.

Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import json

revision: str = "0011"
down_revision: str | None = "0010"


def upgrade() -> None:
    op.add_column("device_events", json("eval", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_events") as batch:
        batch.drop_column("eval")
