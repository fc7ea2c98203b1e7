"""Model registry and director: models, versions, variants, artifacts, assignments,
per-device sequence counters, and each device's reported update status.

Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controlplane.migrations.columns import (
    big_id_reference,
    big_integer,
    device_id,
    double,
    json,
    string,
    text,
)
from controlplane.migrations.tables import create_id_table, create_index, create_table

revision: str = "0002"
down_revision: str | None = "0001"

# Byte order makes the encoded semver sort correctly; PostgreSQL's default
# collation would not compare it byte by byte.
SORT_KEY = sa.String(length=512).with_variant(sa.String(length=512, collation="C"), "postgresql")


def upgrade() -> None:
    op.add_column("devices", json("update_status", nullable=True))

    create_table(
        "models", string("name", 64), double("created_at"), primary_key=("name",)
    )

    create_id_table(
        "model_versions",
        string("model_name", 64),
        string("version", 64),
        sa.Column("sort_key", SORT_KEY, nullable=False),
        double("released_at"),
        double("registered_at"),
        text("description"),
        string("manifest_sha256", 64),
        text("envelope"),
        references=[("model_name", "models.name", "CASCADE")],
        unique=[("model_name", "version")],
    )
    create_index("model_versions", "model_name", "sort_key")

    create_table(
        "artifacts",
        string("path", 256),
        string("sha256", 64),
        big_integer("size_bytes"),
        double("stored_at"),
        primary_key=("path",),
    )

    create_id_table(
        "model_variants",
        big_id_reference("version_id"),
        string("tier", 16),
        string("format", 16),
        string("sha256", 64),
        big_integer("size_bytes"),
        string("artifact", 256),
        string("quantization", 32, nullable=True),
        big_integer("parameters"),
        big_integer("context_length"),
        references=[
            ("artifact", "artifacts.path", "RESTRICT"),
            ("version_id", "model_versions.id", "CASCADE"),
        ],
        unique=[("version_id", "tier")],
    )
    create_index("model_variants", "artifact")

    create_id_table(
        "assignments",
        string("assignment_id", 128),
        device_id(),
        big_id_reference("version_id"),
        string("ref", 128),
        string("tier", 16),
        big_integer("sequence"),
        double("issued_at"),
        double("expires_at"),
        string("rollout_id", 128, nullable=True),
        string("kind", 16),
        string("status", 16),
        double("ended_at", nullable=True),
        text("envelope"),
        references=[
            ("device_id", "devices.id", "CASCADE"),
            ("version_id", "model_versions.id", "RESTRICT"),
        ],
        unique=[("device_id", "sequence")],
    )
    for indexed in (
        ["assignment_id"],
        ["rollout_id"],
        ["version_id"],
        ["device_id", "issued_at"],
        ["status", "expires_at"],
    ):
        create_index("assignments", *indexed)

    # No foreign key to devices: the counter must outlive a deleted device row.
    create_table(
        "device_sequences",
        device_id(),
        big_integer("last_sequence"),
        big_integer("published_sequence"),
        primary_key=("device_id",),
    )


def downgrade() -> None:
    op.drop_table("device_sequences")
    op.drop_table("assignments")
    op.drop_table("model_variants")
    op.drop_table("artifacts")
    op.drop_table("model_versions")
    op.drop_table("models")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("update_status")
