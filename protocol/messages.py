"""Wire messages between agents and the control plane.

Every payload is JSON with an explicit ``schema`` (``slmfleet.<kind>/<n>``),
is validated strictly (unknown fields rejected, strings and lists capped) and
is refused outright above :data:`MAX_PAYLOAD_BYTES` before parsing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from .errors import MalformedPayload, PayloadTooLarge, SchemaMismatch
from .event_codes import EventCode, code_from_reason
from .topics import DEVICE_ID_PATTERN, TopicKind

MAX_PAYLOAD_BYTES = 64 * 1024

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
ShortStr = Annotated[str, StringConstraints(max_length=128)]
LongStr = Annotated[str, StringConstraints(max_length=1024)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Timestamp = Annotated[float, Field(ge=0, description="seconds since the Unix epoch")]
CpuFlag = Annotated[str, StringConstraints(max_length=32)]
Labels = Annotated[dict[ShortStr, ShortStr], Field(max_length=32)]


class Ranked(StrEnum):
    """A string enum whose members are ordered as they are declared."""

    @property
    def rank(self) -> int:
        """The member's place in the declaration: 0 for the first."""
        return type(self)._member_names_.index(self.name)


class Tier(Ranked):
    """Hardware tiers, after the SLM size classes (see DESIGN.md)."""

    # Declared in rank order: micro < small < medium.

    MICRO = "micro"
    SMALL = "small"
    MEDIUM = "medium"


class Strict(BaseModel):
    """Base for every model the protocol validates: unknown fields are refused,
    instances are frozen, and the model is built on first use."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Wire(Strict):
    """:class:`Strict`, with every string capped: wire messages and signed documents."""

    model_config = ConfigDict(str_max_length=4096)


class CpuInfo(Wire):
    model: ShortStr = ""
    arch: ShortStr
    cores: Annotated[int, Field(ge=1, le=4096)]
    threads: Annotated[int, Field(ge=1, le=8192)]
    flags: Annotated[list[CpuFlag], Field(max_length=64)] = []


class Accelerator(Wire):
    kind: Literal["gpu", "npu"]
    vendor: ShortStr = ""
    name: ShortStr = ""
    memory_bytes: NonNegInt = 0


class OsInfo(Wire):
    system: ShortStr
    release: ShortStr = ""
    distro: ShortStr = ""


class Runtime(Wire):
    name: Literal["llama.cpp", "onnxruntime"]
    version: ShortStr
    providers: Annotated[list[ShortStr], Field(max_length=16)] = []


class Capabilities(Wire):
    """What the device's hardware can do, measured by the agent's probe."""

    cpu: CpuInfo
    ram_bytes: NonNegInt
    disk_free_bytes: NonNegInt
    accelerators: Annotated[list[Accelerator], Field(max_length=16)] = []
    os: OsInfo
    board_model: ShortStr = ""


class ActiveModel(Wire):
    name: ShortStr
    version: ShortStr
    tier: Tier
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    #: an active adapter that is not served, and why (its base's build is not
    #: the one it was made for); None while it serves (optional: older agents)
    inactive: LongStr | None = None


class UpdateState(StrEnum):
    """States of the agent's persisted update state machine.

    ``received -> verified -> fit_checked -> downloading -> staged ->
    health_checked -> activated``; or it ends ``rejected`` (the assignment was
    refused before anything was downloaded), ``failed`` (download, staging or
    health check went wrong; the active model never changed),
    ``rolled_back`` (the device went back to the previous version) or
    ``removed`` (the model left the device's desired set; it is no longer
    served, its files are kept for a rollback until garbage collection).

    Waiting is not failing: ``waiting_window`` (the download window is
    closed) and ``waiting_network`` (the link is metered and the policy does
    not allow it) hold before ``downloading``; a health-checked candidate
    whose activation window is closed, or that an update lock defers, stays
    ``staged`` with the reason and the next opening.
    """

    RECEIVED = "received"
    VERIFIED = "verified"
    FIT_CHECKED = "fit_checked"
    WAITING_WINDOW = "waiting_window"
    WAITING_NETWORK = "waiting_network"
    DOWNLOADING = "downloading"
    STAGED = "staged"
    HEALTH_CHECKED = "health_checked"
    ACTIVATED = "activated"
    REJECTED = "rejected"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REMOVED = "removed"

    @property
    def is_final(self) -> bool:
        """True for the states an update ends in."""
        return self in _FINAL_UPDATE_STATES


_FINAL_UPDATE_STATES = frozenset(
    {UpdateState.ACTIVATED, UpdateState.REJECTED, UpdateState.FAILED, UpdateState.ROLLED_BACK,
     UpdateState.REMOVED}
)


class UpdateStatus(Wire):
    """Where the device's latest assignment stands, carried in ``hello``.

    In ``hello/2`` the document's status leaves ``model`` out; each model's
    own update names its model.
    """

    #: the model name this status is about (hello/2, per-model updates)
    model: ShortStr | None = None
    assignment_id: ShortStr
    sequence: NonNegInt
    #: ``name@version`` of the assigned release, when it could be read
    ref: ShortStr | None = None
    state: UpdateState
    reason: LongStr | None = None
    ts: Timestamp
    #: bytes the update fetched over the network for its artifact, once staged
    #: (0: an installed copy was reused; optional: older agents send none)
    downloaded_bytes: NonNegInt | None = None


#: the hello of an agent that runs a set of models and reads ``slmfleet.assignment/2``
HELLO_SCHEMA_SETS = "slmfleet.hello/2"
HELLO_SCHEMA_V1 = "slmfleet.hello/1"
#: models one hello, or one heartbeat, reports at most
MAX_REPORTED_MODELS = 8


class Hello(Wire):
    """Retained capability report, re-sent on every (re)connect.

    Two forms. ``hello/1``: one ``active_model`` and the one ``update``; an
    agent sending it reads only single-model assignments. ``hello/2``: every
    active model in ``models`` and each model's latest update in ``updates``
    (``update`` is then the status of the desired-state document as a
    whole); the agent reads set documents (``slmfleet.assignment/2``).
    """

    schema_: Literal["slmfleet.hello/1", "slmfleet.hello/2"] = Field(
        HELLO_SCHEMA_V1, alias="schema")
    device_id: DeviceId
    ts: Timestamp
    agent_version: ShortStr
    capabilities: Capabilities
    profile: ShortStr
    tier: Tier
    runtimes: Annotated[list[Runtime], Field(max_length=8)] = []
    active_model: ActiveModel | None = None
    #: the latest assignment's state; None before the first one
    update: UpdateStatus | None = None
    labels: Labels = {}
    #: True when the capabilities come from a simulated-hardware override
    #: (``slmfleet dev``, the fleet simulator), never from a real probe.
    simulated: bool = False
    #: hello/2: every active model, one per name
    models: Annotated[list[ActiveModel], Field(max_length=MAX_REPORTED_MODELS)] = []
    #: hello/2: each model's latest update (``model`` set)
    updates: Annotated[list[UpdateStatus], Field(max_length=MAX_REPORTED_MODELS)] = []

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _form(self) -> Hello:
        if self.schema_ == HELLO_SCHEMA_V1 and (self.models or self.updates):
            raise ValueError(f"{HELLO_SCHEMA_V1} has no models or updates; use {HELLO_SCHEMA_SETS}")
        if self.schema_ == HELLO_SCHEMA_SETS and self.active_model is not None:
            raise ValueError(f"{HELLO_SCHEMA_SETS} lists its models in models, not active_model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: a model name is listed twice")
        return self

    @property
    def speaks_sets(self) -> bool:
        """Does this agent read set documents (``slmfleet.assignment/2``)?"""
        return self.schema_ == HELLO_SCHEMA_SETS

    def active_models(self) -> list[ActiveModel]:
        """Every active model, in either form."""
        if self.speaks_sets:
            return list(self.models)
        return [self.active_model] if self.active_model is not None else []

    def model_updates(self) -> list[UpdateStatus]:
        """Each model's latest update; in the old form the one update there is."""
        if self.speaks_sets:
            return list(self.updates)
        return [self.update] if self.update is not None else []


class DeviceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class State(Wire):
    """Retained liveness; the ``offline`` form is the MQTT Last Will."""

    schema_: Literal["slmfleet.state/1"] = Field("slmfleet.state/1", alias="schema")
    device_id: DeviceId
    state: DeviceState
    ts: Timestamp

    model_config = ConfigDict(populate_by_name=True)


class CategoryScore(Wire):
    """Items of one category of an evaluation set: passed of run."""

    passed: NonNegInt
    run: NonNegInt


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class EvalScores(Wire):
    """One model version's score on an evaluation set, as the device measured it.

    ``score`` is passed over ``total`` (items not run count as failed);
    ``stopped_early`` says the time budget ran out before every item ran.
    """

    score: Annotated[float, Field(ge=0, le=1)]
    passed: NonNegInt
    run: NonNegInt
    total: NonNegInt
    by_category: Annotated[dict[ShortStr, CategoryScore], Field(max_length=32)] = {}
    elapsed_s: NonNegFloat | None = None
    stopped_early: bool = False


class EvalOutcome(Wire):
    """An ``evaluated`` event's figures: the candidate's and the active version's scores."""

    eval_sha256: Sha256Hex
    candidate: EvalScores
    #: the version serving when the candidate was checked (None: none served)
    active_sha256: Sha256Hex | None = None
    active: EvalScores | None = None


class InferenceStats(Wire):
    """Inference counters for one model version since the previous heartbeat."""

    model: ShortStr
    version: ShortStr
    requests: NonNegInt = 0
    errors: NonNegInt = 0
    tokens: NonNegInt = 0
    ttft_p50_ms: NonNegFloat | None = None
    ttft_p95_ms: NonNegFloat | None = None
    latency_p50_ms: NonNegFloat | None = None
    latency_p95_ms: NonNegFloat | None = None
    tokens_per_s: NonNegFloat | None = None
    crashes: NonNegInt = 0
    ooms: NonNegInt = 0
    #: telemetry/2: times this version was loaded since the last heartbeat, and
    #: the milliseconds those loads took (a model unloaded by the loaded-model cap
    #: and loaded again on demand)
    loads: NonNegInt | None = None
    load_ms: NonNegFloat | None = None
    #: this version's latest on-device evaluation score (optional: older agents send none)
    eval_score: Annotated[float, Field(ge=0, le=1)] | None = None
    eval_by_category: Annotated[dict[ShortStr, CategoryScore], Field(max_length=32)] | None = None


TELEMETRY_SCHEMA_V1 = "slmfleet.telemetry/1"
#: the heartbeat of an agent that runs a set of models
TELEMETRY_SCHEMA_SETS = "slmfleet.telemetry/2"


class Telemetry(Wire):
    """Periodic heartbeat with resource use and inference counters."""

    schema_: Literal["slmfleet.telemetry/1", "slmfleet.telemetry/2"] = Field(
        TELEMETRY_SCHEMA_V1, alias="schema")
    device_id: DeviceId
    ts: Timestamp
    seq: NonNegInt
    uptime_s: NonNegFloat
    cpu_percent: Annotated[float, Field(ge=0, le=100 * 4096)]
    ram_used_bytes: NonNegInt
    temp_c: Annotated[float, Field(ge=-100, le=200)] | None = None
    active_model: ShortStr | None = None
    inference: Annotated[list[InferenceStats], Field(max_length=8)] = []
    #: telemetry/2: ``name@version`` of every active model (``active_model`` is then unset)
    models: Annotated[list[ShortStr], Field(max_length=MAX_REPORTED_MODELS)] = []
    #: bytes each active ``name@version`` fetched over the network when it was
    #: installed (an adapter's are its own file's, not its base's); optional
    downloaded_bytes: Annotated[dict[ShortStr, NonNegInt],
                                Field(max_length=MAX_REPORTED_MODELS)] | None = None

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _form(self) -> Telemetry:
        if self.schema_ == TELEMETRY_SCHEMA_V1:
            if self.models or any(s.loads is not None or s.load_ms is not None
                                  for s in self.inference):
                raise ValueError(f"{TELEMETRY_SCHEMA_V1} has no models, loads or load_ms; "
                                 f"use {TELEMETRY_SCHEMA_SETS}")
        elif self.active_model is not None:
            raise ValueError(f"{TELEMETRY_SCHEMA_SETS} lists its models in models")
        return self

    def active_refs(self) -> list[str]:
        """``name@version`` of every active model, in either form."""
        if self.schema_ == TELEMETRY_SCHEMA_SETS:
            return list(self.models)
        return [self.active_model] if self.active_model else []


class EventType(StrEnum):
    """Update-pipeline progress reported on ``events``."""

    RECEIVED = "received"
    REJECTED = "rejected"
    VERIFIED = "verified"
    FIT_CHECKED = "fit_checked"
    DOWNLOADING = "downloading"
    STAGED = "staged"
    HEALTH_PASSED = "health_passed"
    HEALTH_FAILED = "health_failed"
    ACTIVATED = "activated"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    #: the model left the desired set and is no longer served
    REMOVED = "removed"
    #: the download waits for its window (``reason`` names the next opening)
    WAITING_WINDOW = "waiting_window"
    #: the download waits for an unmetered link
    WAITING_NETWORK = "waiting_network"
    #: activation held: the activation window is closed or an update lock is held
    DEFERRED = "deferred"
    #: an evaluation set was scored on the candidate (``eval`` carries the scores)
    EVALUATED = "evaluated"


EVENT_SCHEMA = "slmfleet.event/2"
#: the form before events carried a ``code``; still read, its code recovered
#: from the reason (:func:`protocol.event_codes.code_from_reason`)
EVENT_SCHEMA_V1 = "slmfleet.event/1"


class Event(Wire):
    """One update-pipeline step; ``seq`` is monotonic per device (idempotent ingest).

    ``code`` says why a step ended as it did, for programs; ``reason`` says
    it for people. An event in the old form (schema ``slmfleet.event/1``)
    has no ``code`` field: the model fills it from the reason's
    ``"code: detail"`` prefix, so every reader sees a code either way.
    """

    schema_: Literal["slmfleet.event/2", "slmfleet.event/1"] = Field(EVENT_SCHEMA, alias="schema")
    device_id: DeviceId
    ts: Timestamp
    seq: NonNegInt
    type: EventType
    assignment_id: ShortStr | None = None
    code: EventCode | None = None
    reason: LongStr | None = None
    progress_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    #: ``evaluated`` events: the scores (optional: older agents send none)
    eval: EvalOutcome | None = None
    #: ``staged`` and ``activated`` events: bytes the update fetched over the
    #: network for its artifact (0: an installed copy was reused; optional)
    downloaded_bytes: NonNegInt | None = None

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _code_of_old_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schema") == EVENT_SCHEMA_V1:
            if "code" in data:
                raise ValueError(f"{EVENT_SCHEMA_V1} has no code field")
            reason = data.get("reason")
            return {**data, "code": code_from_reason(reason if isinstance(reason, str) else None)}
        return data


DeviceMessage = Hello | State | Telemetry | Event

MODEL_FOR_KIND: dict[TopicKind, type[Wire]] = {
    TopicKind.HELLO: Hello,
    TopicKind.STATE: State,
    TopicKind.TELEMETRY: Telemetry,
    TopicKind.EVENTS: Event,
}


def encode(message: Wire) -> bytes:
    """Serialise a wire message to compact JSON bytes (with ``schema``)."""
    return message.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"


def decode(kind: TopicKind | str, payload: bytes) -> Any:
    """Parse and validate ``payload`` as the message for topic ``kind``.

    Raises :class:`PayloadTooLarge` above the cap (before parsing),
    :class:`SchemaMismatch` when ``schema`` names another message, and
    :class:`MalformedPayload` for anything else that does not validate.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    kind = TopicKind(kind)
    model = MODEL_FOR_KIND.get(kind)
    if model is None:
        raise ValueError(f"no device message is carried on {kind.value!r}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        expected = model.model_fields["schema_"].default
        if any(e["loc"] == ("schema",) for e in exc.errors()):
            raise SchemaMismatch(f"expected schema {expected!r}") from exc
        raise MalformedPayload(_first_error(exc)) from exc
