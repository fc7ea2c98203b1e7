"""Tables of the device registry and its ingest.

Timestamps are float Unix seconds throughout, as on the wire, so a value
goes from payload to row without conversion and compares directly with
``time.time()``. JSON columns use the portable :class:`sqlalchemy.JSON`
type so the same models run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names keep Alembic migrations deterministic across dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: 64-bit ids on PostgreSQL; SQLite only autoincrements an ``INTEGER PRIMARY KEY``.
BigId = BigInteger().with_variant(Integer(), "sqlite")

DEVICE_ID_LEN = 64
SHORT_LEN = 128


class Base(DeclarativeBase):
    """Declarative base with the naming convention and float-as-double mapping."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        float: Double(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


def _device_fk() -> Mapped[str]:
    return mapped_column(
        String(DEVICE_ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), nullable=False
    )


class Device(Base):
    """One row per device: its latest report and liveness.

    A device heard on any topic before its first ``hello`` gets a row with
    the hello fields empty, so telemetry and events are never dropped for
    want of a parent row.
    """

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), primary_key=True)
    tier: Mapped[str | None] = mapped_column(String(16), index=True)
    profile: Mapped[str | None] = mapped_column(String(SHORT_LEN), index=True)
    agent_version: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    simulated: Mapped[bool] = mapped_column(default=False)
    online: Mapped[bool] = mapped_column(default=False)
    first_seen: Mapped[float]
    #: last time the device itself was heard live (retained replays do not count)
    last_seen: Mapped[float | None]
    state_changed_at: Mapped[float]
    active_model: Mapped[dict[str, Any] | None]
    latest_capabilities: Mapped[dict[str, Any] | None]
    latest_runtimes: Mapped[list[Any] | None]


class DeviceLabel(Base):
    """One label of a device, kept beside ``devices.labels`` for filtering.

    Label keys and values are arbitrary strings; matching them inside a JSON
    column depends on each dialect's JSON path syntax (SQLite cannot address
    keys with quotes, backslashes or non-ASCII text), while an indexed table
    matches any string exactly on every database.
    """

    __tablename__ = "device_labels"

    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(SHORT_LEN), primary_key=True)
    value: Mapped[str] = mapped_column(String(SHORT_LEN))

    __table_args__ = (Index("ix_device_labels_key_value", "key", "value"),)


class CapabilitySnapshot(Base):
    """A device's capability report, stored only when it differs from the previous one."""

    __tablename__ = "capability_snapshots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = _device_fk()
    received_at: Mapped[float]
    capabilities: Mapped[dict[str, Any]]
    runtimes: Mapped[list[Any]]
    profile: Mapped[str] = mapped_column(String(SHORT_LEN))
    tier: Mapped[str] = mapped_column(String(16))
    #: sha256 of the canonical JSON of capabilities, runtimes, profile and tier
    digest: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_capability_snapshots_device_id_id", "device_id", "id"),)


class TelemetryRow(Base):
    """One heartbeat."""

    __tablename__ = "telemetry"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = _device_fk()
    ts: Mapped[float]
    received_at: Mapped[float]
    seq: Mapped[int] = mapped_column(BigInteger)
    uptime_s: Mapped[float]
    cpu_percent: Mapped[float]
    ram_used_bytes: Mapped[int] = mapped_column(BigInteger)
    temp_c: Mapped[float | None]
    active_model: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    inference: Mapped[list[Any]]

    __table_args__ = (Index("ix_telemetry_device_id_ts", "device_id", "ts"),)


class DeviceEvent(Base):
    """One update-pipeline step; ``(device_id, seq)`` makes ingest idempotent."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = _device_fk()
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float]
    received_at: Mapped[float]
    type: Mapped[str] = mapped_column(String(32))
    assignment_id: Mapped[str | None] = mapped_column(String(SHORT_LEN), index=True)
    reason: Mapped[str | None] = mapped_column(String(1024))
    progress_pct: Mapped[float | None]

    __table_args__ = (UniqueConstraint("device_id", "seq"),)
