"""Update bytes: ``staged`` and ``activated`` device events keep the bytes moved.

The agent reports how many bytes an update fetched over the network for its
artifact (an adapter's are its own file's, never its base's); the device's
history shows them. Events stored before this revision have none.

Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import big_integer

revision: str = "0013"
down_revision: str | None = "0012"


def upgrade() -> None:
    op.add_column("device_events", big_integer("downloaded_bytes", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_events") as batch:
        batch.drop_column("downloaded_bytes")
