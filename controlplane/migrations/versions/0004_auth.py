"""Access control: API tokens (hashed), audit log, device credentials.

Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import device_id, double, integer, string
from controlplane.migrations.tables import create_id_table, create_index, create_table, drop_index

revision: str = "0004"
down_revision: str | None = "0003"


def upgrade() -> None:
    create_table(
        "api_tokens",
        string("id", 32),
        string("name", 128),
        string("role", 16),
        string("token_sha256", 64),
        double("created_at"),
        double("expires_at", nullable=True),
        double("revoked_at", nullable=True),
        double("last_used_at", nullable=True),
        string("created_by", 32, nullable=True),
        unique=[("token_sha256",)],
    )

    create_id_table(
        "audit_log",
        double("ts"),
        string("token_id", 32, nullable=True),
        string("token_name", 128, nullable=True),
        string("role", 16, nullable=True),
        string("method", 16),
        string("path", 512),
        string("route", 256, nullable=True),
        integer("status"),
        string("client", 128, nullable=True),
    )
    create_index("audit_log", "ts")
    create_index("audit_log", "token_id")

    create_table(
        "device_credentials",
        device_id(),
        string("password_hash", 256),
        double("created_at"),
        double("revoked_at", nullable=True),
        string("created_by", 32, nullable=True),
        primary_key=("device_id",),
    )
    create_index("device_credentials", "revoked_at")


def downgrade() -> None:
    drop_index("device_credentials", "revoked_at")
    op.drop_table("device_credentials")
    drop_index("audit_log", "token_id")
    drop_index("audit_log", "ts")
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
