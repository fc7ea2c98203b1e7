"""Response bodies of the API, kept apart from the tables they are read from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from .schemas_base import FromRow
from .schemas_policies import WaitingOut
from .schemas_registry import AssignmentSummary


class DeviceSummary(FromRow):
    """A device as listed: identity, placement and liveness."""

    id: str
    tier: str | None = Field(description="null until the device's first hello")
    profile: str | None
    agent_version: str | None
    labels: dict[str, str]
    simulated: bool = Field(description="capabilities come from a simulated-hardware override")
    online: bool
    first_seen: float = Field(description="Unix seconds")
    last_seen: float | None = Field(description="last time heard live, Unix seconds")
    state_changed_at: float = Field(description="last online/offline transition, Unix seconds")
    active_model: dict[str, Any] | None = Field(
        description="the device's one active model (old form, or a set of one); see models")
    assignment_form: Literal["single", "set"] = Field(description=(
        "the desired-state form the device's agent reads: single (slmfleet.hello/1, one "
        "model; upgrade its agent to assign it more) or set (slmfleet.hello/2)"))
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="every active model by name (name, version, tier, sha256), from hello")

    @field_validator("models", mode="before")
    @classmethod
    def _none_is_no_models(cls, value: Any) -> Any:
        # A device heard before its first hello has no models column yet.
        return {} if value is None else value


class TelemetryPoint(FromRow):
    """One heartbeat as stored."""

    ts: float
    received_at: float
    seq: int
    uptime_s: float
    cpu_percent: float
    ram_used_bytes: int
    temp_c: float | None
    active_model: str | None
    inference: list[dict[str, Any]]


class DeviceModel(BaseModel):
    """One model name on a device: what runs, what is assigned, where its update stands."""

    name: str
    version: str | None = Field(description="the version the device reports active")
    tier: str | None = Field(description="the active variant's tier, else the assigned one's")
    sha256: str | None = None
    state: Literal["serving", "inactive", "updating", "failed", "removing", "unmanaged"] = Field(
        description=(
            "serving: runs what is assigned; inactive: an adapter that is installed as "
            "assigned but not served (its base's build is not the one it was made for, see "
            "reason); updating: an assigned version is on its way; "
            "failed: the device refused or failed the assigned version; removing: taken "
            "off, still reported active; unmanaged: active with no assignment (old form)"))
    reason: str | None = Field(None, description="inactive: why the device does not serve it")
    assignment: AssignmentSummary | None = Field(description="its live assignment, if any")
    update: dict[str, Any] | None = Field(description="its latest update, as hello reported")


class DeviceDetail(DeviceSummary):
    """A device with its latest capability report, recent telemetry and assignment."""

    capabilities: dict[str, Any] | None = Field(description="latest capability report")
    runtimes: list[dict[str, Any]] | None
    recent_telemetry: list[TelemetryPoint] = Field(description="newest first")
    update: dict[str, Any] | None = Field(
        None, description="the agent's latest update state, as reported in hello.update"
    )
    assignment: AssignmentSummary | None = Field(
        None, description=("the live assignment the control plane issued, if any (with "
                           "several models: the one assigned last; see models)")
    )
    models: dict[str, DeviceModel] = Field(  # type: ignore[assignment]
        default_factory=dict,
        description="every model name the device runs or is assigned, with its state",
    )
    waiting: list[WaitingOut] = Field(
        default_factory=list,
        description="entries whose update waits on the device (window, lock, network), why "
                    "and until when",
    )


class DevicePage(BaseModel):
    """One page of devices; pass ``next`` as ``cursor`` for the following page."""

    items: list[DeviceSummary]
    next: str | None


class Health(BaseModel):
    """Liveness of the control plane's dependencies."""

    status: Literal["ok", "degraded"]
    database: bool
    mqtt: bool
    #: whether this replica holds the leader lease (runs the rollout engine and
    #: re-signing); None where no election runs
    leader: bool | None = None


class IngestStats(BaseModel):
    """Counters of the MQTT ingest since this process started."""

    received: int
    accepted: int
    written: int
    rejected: dict[str, int] = Field(description="refused messages by reason")
    rejected_total: int
    dropped: int = Field(description="accepted but abandoned at shutdown")
    batches: int
    last_batch_ms: float | None
    last_batch_size: int
    write_errors: int = Field(description="failed batch write attempts (retried)")
    queue_depth: int
    queue_max: int
    connected: bool
