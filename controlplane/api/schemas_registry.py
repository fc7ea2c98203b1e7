"""Request and response bodies of the registry, artifact and assignment routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints

from protocol import Tier

from .schemas_base import FromRow

ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=128)]
#: one call may name at most this many devices explicitly
MAX_SELECTOR_IDS = 10_000


class ArtifactOut(FromRow):
    """A verified file in the artifact store."""

    path: str
    sha256: str
    size_bytes: int
    stored_at: float = Field(description="Unix seconds")


class ModelSummary(BaseModel):
    """A model name and its newest version (semver)."""

    name: str
    created_at: float
    latest_version: str | None
    description: str


class ModelPage(BaseModel):
    """One page of models; pass ``next`` as ``cursor`` for the following page."""

    items: list[ModelSummary]
    next: str | None


class VariantOut(FromRow):
    """One tier's variant, as registered."""

    tier: str
    format: str
    sha256: str
    size_bytes: int
    artifact: str
    quantization: str | None
    parameters: int
    context_length: int


class VersionSummary(FromRow):
    """A registered release."""

    name: str = Field(validation_alias=AliasChoices("model_name", "name"))
    version: str
    released_at: float
    registered_at: float
    description: str
    manifest_sha256: str = Field(description="sha256 of the canonical signed manifest")


class VersionPage(BaseModel):
    """One page of versions, newest (semver) first."""

    items: list[VersionSummary]
    next: str | None


class VersionDetail(VersionSummary):
    """A release with its variants, manifest and the signed envelope as registered."""

    variants: list[VariantOut]
    manifest: dict[str, Any] = Field(description="the signed manifest (envelope.signed)")
    envelope: dict[str, Any] = Field(description="the release envelope, signatures included")


class Selector(BaseModel):
    """Devices to assign: every given criterion must match (values in a list: any)."""

    model_config = ConfigDict(extra="forbid")

    tiers: list[Tier] | None = None
    profiles: Annotated[list[ShortStr], Field(max_length=100)] | None = None
    labels: Annotated[dict[ShortStr, Annotated[str, StringConstraints(max_length=128)]],
                      Field(max_length=32)] | None = None
    device_ids: Annotated[list[ShortStr], Field(max_length=MAX_SELECTOR_IDS)] | None = None

    def is_empty(self) -> bool:
        """True when no criterion is given (which would match the whole fleet)."""
        return not (self.tiers or self.profiles or self.labels or self.device_ids)


class AssignRequest(BaseModel):
    """Pin devices to ``model@version``."""

    model_config = ConfigDict(extra="forbid")

    model: ShortStr
    version: ShortStr
    selector: Selector | None = Field(
        None, description="with device id `*` in the path: the devices to assign"
    )


class AssignResultOut(FromRow):
    """What happened for one device."""

    device_id: str
    status: Literal["assigned", "incompatible", "unknown_device", "unassigned", "not_assigned",
                    "needs_upgrade"] = Field(description=(
        "needs_upgrade: the device's agent reads one model (slmfleet.hello/1) and runs "
        "another; upgrade it to assign a second"))
    tier: str | None = Field(None, description="the variant tier chosen")
    assignment_id: str | None = None
    sequence: int | None = None
    expires_at: float | None = None
    reason: str | None = None


class AssignResponse(BaseModel):
    """Per-device results of an assignment request, with counts."""

    model: str
    version: str
    results: list[AssignResultOut]
    assigned: int
    incompatible: int
    unknown: int
    needs_upgrade: int = Field(0, description="devices whose agent reads one model only")


class AssignmentSummary(FromRow):
    """A device's live assignment of one model."""

    model_name: str = Field(description="the model name the entry is for")
    assignment_id: str
    ref: str = Field(description="name@version")
    tier: str
    sequence: int
    issued_at: float
    expires_at: float
    rollout_id: str | None
    published: bool = Field(description="the broker acknowledged it on the device's desired topic")


class HistoryItem(BaseModel):
    """One step of a device's timeline: an assignment issued or ended, or a device event."""

    ts: float = Field(description="Unix seconds: issue time, or the device's event time")
    kind: Literal["assignment", "event"]
    type: str = Field(
        description="assigned | refreshed | unassigned, or the event type (received, ...)"
    )
    model: str | None = Field(None, description="the model name (assignment steps)")
    assignment_id: str | None = None
    ref: str | None = None
    tier: str | None = None
    sequence: int | None = Field(None, description="assignment sequence")
    rollout_id: str | None = None
    expires_at: float | None = None
    seq: int | None = Field(None, description="device event sequence")
    code: str | None = Field(
        None, description="why the step ended so, for programs: a value of protocol.EventCode"
    )
    reason: str | None = Field(None, description="the same, for people")
    progress_pct: float | None = None
    downloaded_bytes: int | None = Field(
        None, description="staged and activated events: bytes the update fetched for its artifact"
    )
    received_at: float | None = None


class HistoryPage(BaseModel):
    """One page of a device's timeline, oldest first."""

    items: list[HistoryItem]
    next: str | None
