"""Telemetry retention: hourly rollups, retention marks, the liveness index, and on
PostgreSQL ``telemetry`` partitioned by day of ``ts``.

On PostgreSQL the existing ``telemetry`` becomes ``PARTITION BY RANGE (ts)``
(controlplane/retention/partitions.py): its primary key becomes
``(id, ts)`` and its unique index stays ``(device_id, ts, seq)``, both
including the partition key as PostgreSQL requires; the id sequence is kept.
Day partitions are made for the days the existing rows cover (at most the
last 60) and a few days ahead, older rows go to ``telemetry_default``. The
retention job keeps making days ahead from then on.

Create Date: 2026-12-06
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

from controlplane.migrations.columns import big_integer, double, string
from controlplane.migrations.tables import create_device_table, create_table

revision: str = "0008"
down_revision: str | None = "0007"

DAY_S = 86400
#: the most days of existing telemetry given partitions of their own
_BACKFILL_DAYS = 60
_AHEAD_DAYS = 3
_WEIGHTED = ("ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "latency_p95_ms", "tokens_per_s")


def upgrade() -> None:
    create_device_table(
        "telemetry_hourly",
        double("hour"),
        string("model", 128),
        string("version", 128),
        big_integer("heartbeats"),
        double("cpu_percent_sum"),
        double("cpu_percent_max"),
        big_integer("ram_used_bytes_max"),
        double("temp_c_max", nullable=True),
        *(big_integer(name) for name in ("requests", "errors", "tokens", "crashes", "ooms")),
        *(double(f"{name}_{part}") for name in _WEIGHTED for part in ("wsum", "weight")),
    )
    op.create_index("uq_telemetry_hourly_device_id_hour_model_version", "telemetry_hourly",
                    ["device_id", "hour", "model", "version"], unique=True)
    op.create_index("ix_telemetry_hourly_hour", "telemetry_hourly", ["hour"])
    create_table("retention_marks", string("name", 64), double("value"),
                 primary_key=("name",))
    op.create_index("ix_devices_online_last_seen", "devices", ["online", "last_seen"])
    if op.get_bind().dialect.name == "postgresql":
        _partition_telemetry()


def _partition_telemetry() -> None:
    conn = op.get_bind()
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_old")
    op.execute("ALTER TABLE telemetry_old RENAME CONSTRAINT pk_telemetry TO pk_telemetry_old")
    op.execute("ALTER TABLE telemetry_old RENAME CONSTRAINT fk_telemetry_device_id_devices "
               "TO fk_telemetry_old_device_id_devices")
    op.execute("ALTER INDEX uq_telemetry_device_id_ts_seq RENAME TO uq_telemetry_old_seq")
    op.execute("CREATE TABLE telemetry (LIKE telemetry_old INCLUDING DEFAULTS) "
               "PARTITION BY RANGE (ts)")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (id, ts)")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT fk_telemetry_device_id_devices "
               "FOREIGN KEY (device_id) REFERENCES devices (id) ON DELETE CASCADE")
    op.execute("CREATE UNIQUE INDEX uq_telemetry_device_id_ts_seq "
               "ON telemetry (device_id, ts, seq)")
    op.execute("CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT")
    today = time.time() // DAY_S * DAY_S
    oldest = conn.execute(sa.text("SELECT min(ts) FROM telemetry_old")).scalar()
    first = max(oldest // DAY_S * DAY_S if oldest is not None else today,
                today - _BACKFILL_DAYS * DAY_S)
    day = first
    while day <= today + _AHEAD_DAYS * DAY_S:
        name = time.strftime("telemetry_p%Y%m%d", time.gmtime(day))
        op.execute(f"CREATE TABLE {name} PARTITION OF telemetry "
                   f"FOR VALUES FROM ({day:.0f}) TO ({day + DAY_S:.0f})")
        day += DAY_S
    op.execute("INSERT INTO telemetry SELECT * FROM telemetry_old")
    # The id sequence belongs to the new table, so it outlives the old one.
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")
    op.execute("DROP TABLE telemetry_old")


def _unpartition_telemetry() -> None:
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_parts")
    op.execute("ALTER TABLE telemetry_parts RENAME CONSTRAINT pk_telemetry TO pk_telemetry_parts")
    op.execute("ALTER TABLE telemetry_parts RENAME CONSTRAINT fk_telemetry_device_id_devices "
               "TO fk_telemetry_parts_device_id_devices")
    op.execute("ALTER INDEX uq_telemetry_device_id_ts_seq RENAME TO uq_telemetry_parts_seq")
    op.execute("CREATE TABLE telemetry (LIKE telemetry_parts INCLUDING DEFAULTS)")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (id)")
    op.execute("ALTER TABLE telemetry ADD CONSTRAINT fk_telemetry_device_id_devices "
               "FOREIGN KEY (device_id) REFERENCES devices (id) ON DELETE CASCADE")
    op.execute("CREATE UNIQUE INDEX uq_telemetry_device_id_ts_seq "
               "ON telemetry (device_id, ts, seq)")
    op.execute("INSERT INTO telemetry SELECT * FROM telemetry_parts")
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")
    op.execute("DROP TABLE telemetry_parts")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_telemetry()
    op.drop_index("ix_devices_online_last_seen", table_name="devices")
    op.drop_table("retention_marks")
    op.drop_index("ix_telemetry_hourly_hour", table_name="telemetry_hourly")
    op.drop_index("uq_telemetry_hourly_device_id_hour_model_version",
                  table_name="telemetry_hourly")
    op.drop_table("telemetry_hourly")
