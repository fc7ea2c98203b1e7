"""Initial schema: devices and their labels, capability snapshots, telemetry, events.

Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

from controlplane.migrations.columns import big_integer, boolean, device_id, double, json, string
from controlplane.migrations.tables import DEVICE, create_device_table, create_index, create_table

revision: str = "0001"
down_revision: str | None = None


def upgrade() -> None:
    create_table(
        "devices",
        string("id", 64),
        string("tier", 16, nullable=True),
        string("profile", 128, nullable=True),
        string("agent_version", 128, nullable=True),
        json("labels"),
        boolean("simulated"),
        boolean("online"),
        double("first_seen"),
        double("last_seen", nullable=True),
        double("state_changed_at"),
        json("active_model", nullable=True),
        json("latest_capabilities", nullable=True),
        json("latest_runtimes", nullable=True),
    )
    create_index("devices", "profile")
    create_index("devices", "tier")

    create_table(
        "device_labels",
        device_id(),
        string("key", 128),
        string("value", 128),
        primary_key=("device_id", "key"),
        references=[DEVICE],
    )
    create_index("device_labels", "key", "value")

    create_device_table(
        "capability_snapshots",
        double("received_at"),
        json("capabilities"),
        json("runtimes"),
        string("profile", 128),
        string("tier", 16),
        string("digest", 64),
    )
    create_index("capability_snapshots", "device_id", "id")

    create_device_table(
        "device_events",
        big_integer("seq"),
        double("ts"),
        double("received_at"),
        string("type", 32),
        string("assignment_id", 128, nullable=True),
        string("reason", 1024, nullable=True),
        double("progress_pct", nullable=True),
        unique=[("device_id", "seq")],
    )
    create_index("device_events", "assignment_id")

    create_device_table(
        "telemetry",
        double("ts"),
        double("received_at"),
        big_integer("seq"),
        double("uptime_s"),
        double("cpu_percent"),
        big_integer("ram_used_bytes"),
        double("temp_c", nullable=True),
        string("active_model", 128, nullable=True),
        json("inference"),
    )
    create_index("telemetry", "device_id", "ts")


def downgrade() -> None:
    op.drop_table("telemetry")
    op.drop_table("device_events")
    op.drop_table("capability_snapshots")
    op.drop_table("device_labels")
    op.drop_table("devices")
