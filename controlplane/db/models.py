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
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protocol import EventCode

from .statuses import AssignmentStatus, MemberState, RolloutState, status_type

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
EVENT_CODE_LEN = 32


class Base(DeclarativeBase):
    """Declarative base with the naming convention and float-as-double mapping."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        float: Double(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


def big_id(**options: Any) -> Mapped[int]:
    """The autoincrementing 64-bit ``id`` primary key of a table of many rows."""
    return mapped_column(BigId, primary_key=True, autoincrement=True, **options)


def _device_fk(**options: Any) -> Mapped[str]:
    return mapped_column(
        String(DEVICE_ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), nullable=False,
        **options,
    )


class _DeviceRows:
    """Mixin of a table of many rows about one device each: ``id``, then ``device_id``."""

    # First in the table, where the migrations put them.
    id: Mapped[int] = big_id(sort_order=-2)
    device_id: Mapped[str] = _device_fk(sort_order=-1)


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
    #: the agent's latest assignment state (``hello.update``), as it reported it
    update_status: Mapped[dict[str, Any] | None]
    #: the desired-state form its agent reads: ``single`` (hello/1, one model;
    #: also a device never heard from) or ``set`` (hello/2, a set of models)
    assignment_form: Mapped[str] = mapped_column(
        String(8), server_default="single", index=True)
    #: every active model by name, as the latest hello reported it
    models: Mapped[dict[str, Any] | None]
    #: each model's latest update by name, as the latest hello reported it
    model_updates: Mapped[dict[str, Any] | None]


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


class CapabilitySnapshot(_DeviceRows, Base):
    """A device's capability report, stored only when it differs from the previous one."""

    __tablename__ = "capability_snapshots"

    received_at: Mapped[float]
    capabilities: Mapped[dict[str, Any]]
    runtimes: Mapped[list[Any]]
    profile: Mapped[str] = mapped_column(String(SHORT_LEN))
    tier: Mapped[str] = mapped_column(String(16))
    #: sha256 of the canonical JSON of capabilities, runtimes, profile and tier
    digest: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_capability_snapshots_device_id_id", "device_id", "id"),)


class TelemetryRow(_DeviceRows, Base):
    """One heartbeat."""

    __tablename__ = "telemetry"

    ts: Mapped[float]
    received_at: Mapped[float]
    seq: Mapped[int] = mapped_column(BigInteger)
    uptime_s: Mapped[float]
    cpu_percent: Mapped[float]
    ram_used_bytes: Mapped[int] = mapped_column(BigInteger)
    temp_c: Mapped[float | None]
    active_model: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    inference: Mapped[list[Any]]

    # Unique, so a QoS 1 redelivery (or the same message reaching two replicas
    # around a reconnect) is stored once: an agent numbers heartbeats from 1
    # each start, so (device, ts, seq) identifies one. Leading with
    # (device_id, ts) it also serves "a device's latest telemetry".
    __table_args__ = (
        Index("uq_telemetry_device_id_ts_seq", "device_id", "ts", "seq", unique=True),
    )


class Lease(Base):
    """A named lease (controlplane/leader.py): who holds it, until when, and how
    many times it changed hands (``epoch``, the fencing token)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128))
    expires_at: Mapped[float]
    epoch: Mapped[int]


class DeviceEvent(_DeviceRows, Base):
    """One update-pipeline step; ``(device_id, seq)`` makes ingest idempotent."""

    __tablename__ = "device_events"

    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float]
    received_at: Mapped[float]
    type: Mapped[str] = mapped_column(String(32))
    assignment_id: Mapped[str | None] = mapped_column(String(SHORT_LEN), index=True)
    #: why the step ended as it did, for programs (``reason`` is for people);
    #: events in the old form get it from their reason's ``"code: detail"`` prefix
    code: Mapped[EventCode | None] = mapped_column(status_type(EventCode, EVENT_CODE_LEN))
    reason: Mapped[str | None] = mapped_column(String(1024))
    progress_pct: Mapped[float | None]
    #: an ``evaluated`` event's scores (:class:`protocol.EvalOutcome`)
    eval: Mapped[dict[str, Any] | None]
    #: ``staged`` / ``activated`` events: bytes the update fetched for its artifact
    downloaded_bytes: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("device_id", "seq"),)


# --- model registry (docs/models.md) -------------------------------------------

#: release names and semver strings are capped at 64 characters by the protocol
NAME_LEN = 64
VERSION_LEN = 64
#: hex of the order-preserving semver encoding (controlplane.semver_order)
SORT_KEY_LEN = 512
ARTIFACT_PATH_LEN = 256
#: a path in the artifact index: a folder variant's artifact, ``/``, a file's path
INDEXED_PATH_LEN = 512
SHA256_LEN = 64


class Model(Base):
    """A model name; its versions hang off it."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    created_at: Mapped[float]


class ModelVersion(Base):
    """One signed release of a model, kept exactly as the release keys signed it."""

    __tablename__ = "model_versions"

    id: Mapped[int] = big_id()
    model_name: Mapped[str] = mapped_column(
        String(NAME_LEN), ForeignKey("models.name", ondelete="CASCADE"), nullable=False
    )
    version: Mapped[str] = mapped_column(String(VERSION_LEN))
    #: sorts like semver precedence under byte order (collation "C" on PostgreSQL)
    sort_key: Mapped[str] = mapped_column(
        String(SORT_KEY_LEN).with_variant(String(SORT_KEY_LEN, collation="C"), "postgresql")
    )
    released_at: Mapped[float]
    registered_at: Mapped[float]
    description: Mapped[str] = mapped_column(Text, default="")
    #: sha256 of the canonical JSON of the signed manifest: what "identical" means
    manifest_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    #: the signed release envelope as canonical JSON; its signatures cover the
    #: canonical form of ``signed``, so this text verifies as uploaded
    envelope: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("model_name", "version"),
        Index("ix_model_versions_model_name_sort_key", "model_name", "sort_key"),
    )


class Artifact(Base):
    """A path agents fetch, resolved for good to the blob (by sha256) it names."""

    __tablename__ = "artifacts"

    path: Mapped[str] = mapped_column(String(INDEXED_PATH_LEN), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[float]


class ModelVariant(Base):
    """One tier's variant of a release, copied out of the manifest for queries."""

    __tablename__ = "model_variants"

    id: Mapped[int] = big_id()
    version_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False
    )
    tier: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: the file, or a folder variant's folder, under the artifact base URL; what
    #: it resolves to is kept alive by the release's :class:`ReleaseFile` rows
    artifact: Mapped[str] = mapped_column(String(ARTIFACT_PATH_LEN), nullable=False, index=True)
    quantization: Mapped[str | None] = mapped_column(String(32))
    parameters: Mapped[int] = mapped_column(BigInteger)
    context_length: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("version_id", "tier"),)


class ReleaseFile(Base):
    """One file a registered release refers to: a variant's file, each file of a
    folder variant, its eval set. Garbage collection keeps every blob named here."""

    __tablename__ = "release_files"

    version_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(INDEXED_PATH_LEN), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class AssignmentRecord(Base):
    """One model name's entry in a device's signed desired state, as issued.

    Every document the director signs for a device gets one row per entry,
    all with the document's ``sequence`` and validity. The entry that
    changed is ``kind`` ``assign``; the others, and every entry of a re-sign,
    keep ``assignment_id``, release and tier and are ``refresh`` rows. The
    rows they replace become ``superseded`` (``revoked`` for a model taken
    off the device). At most one row per device and model name is ``active``.
    The signed document itself is the device's :class:`DesiredDocument`.
    """

    __tablename__ = "assignments"

    id: Mapped[int] = big_id()
    assignment_id: Mapped[str] = mapped_column(String(SHORT_LEN), index=True)
    device_id: Mapped[str] = _device_fk()
    version_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    #: the model name the entry is for (its release's name)
    model_name: Mapped[str] = mapped_column(String(NAME_LEN))
    #: ``name@version`` of the release, kept beside the key for timelines
    ref: Mapped[str] = mapped_column(String(SHORT_LEN))
    tier: Mapped[str] = mapped_column(String(16))
    sequence: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[float]
    expires_at: Mapped[float]
    rollout_id: Mapped[str | None] = mapped_column(String(SHORT_LEN), index=True)
    #: ``assign`` (a new assignment) or ``refresh`` (a re-sign of the same one)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[AssignmentStatus] = mapped_column(status_type(AssignmentStatus, 16))
    #: when it stopped being active
    ended_at: Mapped[float | None]
    #: the signed document, for rows written before it moved to
    #: ``desired_documents``; None since
    envelope: Mapped[str | None] = mapped_column(Text)
    #: the entry's effective :class:`protocol.UpdatePolicy` as signed; None: none
    policy: Mapped[dict[str, Any] | None]

    __table_args__ = (
        UniqueConstraint("device_id", "model_name", "sequence"),
        Index("uq_assignments_active_device_id_model_name", "device_id", "model_name",
              unique=True, sqlite_where=text("status = 'active'"),
              postgresql_where=text("status = 'active'")),
        Index("ix_assignments_status_expires_at", "status", "expires_at"),
        Index("ix_assignments_device_id_issued_at", "device_id", "issued_at"),
    )


class DeviceSequence(Base):
    """Per device: the highest assignment sequence issued and the one on the broker.

    No foreign key to ``devices`` on purpose: agents persist the highest
    sequence they accepted and refuse anything not above it, so this counter
    must outlive a device row that is deleted and re-created.
    """

    __tablename__ = "device_sequences"

    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), primary_key=True)
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    #: the ``last_sequence`` whose desired state the broker acknowledged; below
    #: ``last_sequence`` means the publisher still owes the device a message
    published_sequence: Mapped[int] = mapped_column(BigInteger)


class DesiredDocument(Base):
    """Per device: its current signed desired-state document, the ``desired`` payload.

    Written in the transaction that bumps the device's :class:`DeviceSequence`;
    a table of its own so the counter rows, bumped and acknowledged for every
    document, stay a few bytes each. No foreign key to ``devices``, like the
    counter: a device row deleted meanwhile leaves a cleared document behind.
    """

    __tablename__ = "desired_documents"

    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), primary_key=True)
    #: the signed envelope as canonical JSON; None: the device's ``desired`` is cleared
    envelope: Mapped[str | None] = mapped_column(Text)
    #: when it expires (the re-sign job's key); None without one
    expires_at: Mapped[float | None] = mapped_column(index=True)
    #: the form it was signed in: ``single`` (assignment/1) or ``set`` (assignment/2)
    form: Mapped[str | None] = mapped_column(String(8))


# --- rollouts (docs/rollouts.md) -------------------------------------------------

ROLLOUT_ID_LEN = 32


class Rollout(Base):
    """One staged rollout of a release to the devices its selector matches.

    ``spec`` is the validated spec as submitted; ``stage_index`` and
    ``stage_started_at`` say where it stands. ``revision`` is bumped by every
    state change, and each change is a conditional update on it, so two
    writers (an engine tick and an API call, or two replicas) can never both
    apply a change made from the same view.
    """

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(ROLLOUT_ID_LEN), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    version: Mapped[str] = mapped_column(String(VERSION_LEN))
    version_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False
    )
    spec: Mapped[dict[str, Any]]
    state: Mapped[RolloutState] = mapped_column(status_type(RolloutState, 24), index=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    stage_started_at: Mapped[float | None]
    #: the stage index an operator approved (manual approval before a stage)
    approved_stage: Mapped[int] = mapped_column(Integer, default=-1)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float]
    updated_at: Mapped[float]
    #: why the rollout is in its state, in words
    reason: Mapped[str | None] = mapped_column(String(1024))
    #: the latest gate evaluation of the current stage, as the engine measured it
    last_gates: Mapped[list[Any] | None]
    #: when the current stage had enough activated devices for its bake to start
    bake_started_at: Mapped[float | None]


class RolloutDevice(Base):
    """A device the rollout matched, and where it stands in it."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(
        String(ROLLOUT_ID_LEN), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_LEN), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    #: the device's own tier when it joined (gates compare within a tier)
    device_tier: Mapped[str | None] = mapped_column(String(16))
    #: the variant it gets; None when incompatible
    variant_tier: Mapped[str | None] = mapped_column(String(16))
    #: position in the deterministic cohort order, from hash(rollout id, device id)
    cohort_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[MemberState] = mapped_column(status_type(MemberState, 16))
    #: the stage whose cohort it belongs to once assigned
    stage_index: Mapped[int | None] = mapped_column(Integer)
    assignment_id: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    assigned_at: Mapped[float | None]
    #: the version it ran when it joined (``name@version``), where rollback goes
    previous_ref: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    health: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(1024))
    updated_at: Mapped[float]

    __table_args__ = (
        Index("ix_rollout_devices_rollout_id_state", "rollout_id", "state"),
        Index("ix_rollout_devices_device_id", "device_id"),
    )


class RolloutDecision(Base):
    """Something the engine or an operator decided, with the reason; the timeline."""

    __tablename__ = "rollout_decisions"

    id: Mapped[int] = big_id()
    rollout_id: Mapped[str] = mapped_column(
        String(ROLLOUT_ID_LEN), ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False
    )
    ts: Mapped[float]
    #: e.g. ``created``, ``stage_started``, ``gate_failed``, ``rolled_back``
    kind: Mapped[str] = mapped_column(String(32))
    stage_index: Mapped[int | None] = mapped_column(Integer)
    #: ``engine`` or ``operator``
    actor: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(2048))
    details: Mapped[dict[str, Any] | None]

    __table_args__ = (Index("ix_rollout_decisions_rollout_id_id", "rollout_id", "id"),)
