"""The desired-state set: every model one device should run, in one signed document.

Uptane's director signs one targets list naming every image an ECU set
should run; slmfleet's director does the same for models. An
:class:`AssignmentSet` (schema ``slmfleet.assignment/2``) names a device,
one sequence number, an issue and expiry time, and maps each **model name**
to a :class:`ModelEntry`: the release (its envelope embedded verbatim, still
signed by the offline release keys), the tier of the chosen variant, the
rollout that put it there and that entry's own ``assignment_id`` (what the
device's events about that model name). A name absent from the set is a
model the device should stop serving (it keeps the files for rollback until
garbage collection).

:func:`verify_desired` is the agent's acceptance check for either form:

- the document-level checks A1-A8 of :mod:`.assignment` (size, shape,
  director threshold, addressed here, in its window, sequence above the
  highest accepted) refuse the **whole** document;
- the per-entry checks A9-A11 (release signature, the tier exists, it fits
  the device) and the entry's name matching its release refuse **that
  entry only** (:class:`RefusedEntry`); the others stand. Entries sharing a
  ``unit`` (an adapter and its base) stand or fall together.

An old single-model assignment (``slmfleet.assignment/1``) verifies as a set
of one, named after its release, with ``legacy`` set.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from .assignment import (
    ASSIGNMENT_SCHEMA,
    MAX_ASSIGNMENT_BYTES,
    Assignment,
    AssignmentId,
    SignedAssignment,
    check_addressing,
    check_caller,
    check_release,
)
from .canonical import canonical_json, canonical_object
from .errors import MalformedPayload, ProtocolError
from .keys import (
    KeyList,
    PositiveInt,
    Signatures,
    SignedPart,
    Timestamp,
    make_envelope_bytes,
    verify_envelope,
)
from .manifest import RELEASE_NAME_PATTERN, ReleaseManifest, Variant
from .messages import Capabilities, DeviceId, Strict, Tier
from .update_policy import UpdatePolicy

ASSIGNMENT_SET_SCHEMA = "slmfleet.assignment/2"

#: models one device may be told to run at once
MAX_MODELS = 8

ModelName = Annotated[str, StringConstraints(pattern=RELEASE_NAME_PATTERN)]
UnitName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
ArtifactBase = Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://[!-~]+$")]


class ModelEntry(SignedPart):
    """One model name's part of a device's desired state."""

    #: names this (device, model) assignment in the device's events and the control plane
    assignment_id: AssignmentId
    rollout_id: AssignmentId | None = None
    #: the tier of the chosen variant in ``release``
    tier: Tier
    #: the SignedRelease envelope exactly as the release signers produced it
    release: dict[str, Any]
    #: entries with the same unit are accepted, installed and activated together
    #: or not at all (an adapter and its base); None: independent
    unit: UnitName | None = None
    #: when and how fast this model may download and activate; None: any time, uncapped
    policy: UpdatePolicy | None = None


class AssignmentSet(SignedPart):
    """Every model one device should run now, until ``expires_at``.

    Re-signing before expiry raises ``sequence``; an entry whose release,
    tier and assignment id are unchanged is a refresh for the agent, not a
    new install.
    """

    schema_: Literal["slmfleet.assignment/2"] = Field(ASSIGNMENT_SET_SCHEMA, alias="schema")
    device_id: DeviceId
    sequence: PositiveInt
    issued_at: Timestamp
    expires_at: Timestamp
    #: model name -> what it should run; empty: the device should run nothing
    models: Annotated[dict[ModelName, ModelEntry], Field(max_length=MAX_MODELS)]
    #: where to fetch artifacts (``<base>/<variant.artifact>``); None: agent default
    artifact_url_base: ArtifactBase | None = None

    @model_validator(mode="after")
    def _check(self) -> AssignmentSet:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        ids = [entry.assignment_id for entry in self.models.values()]
        if len(set(ids)) != len(ids):
            raise ValueError("two models share an assignment_id")
        return self


class SignedAssignmentSet(Strict):
    """Envelope of a set document, signed by a threshold of director keys."""

    signed: AssignmentSet
    signatures: Signatures


@dataclass(frozen=True, slots=True)
class VerifiedEntry:
    """A model entry that passed every check, with its release and chosen variant."""

    name: str
    entry: ModelEntry
    manifest: ReleaseManifest
    variant: Variant

    @property
    def tier(self) -> Tier:
        """The tier of the chosen variant."""
        return self.entry.tier

    @property
    def assignment_id(self) -> str:
        """The entry's assignment id (what the device's events name)."""
        return self.entry.assignment_id


@dataclass(frozen=True, slots=True)
class RefusedEntry:
    """A model entry refused on its own; the rest of its document stands."""

    name: str
    assignment_id: str
    error: ProtocolError


@dataclass(frozen=True, slots=True)
class VerifiedDesired:
    """A desired-state document that passed the document checks.

    ``entries`` are the models to run; ``refused`` the entries that failed
    their own checks (each with its error). ``legacy`` marks a document in
    the old single-model form.
    """

    device_id: str
    sequence: int
    issued_at: float
    expires_at: float
    artifact_url_base: str | None
    entries: Mapping[str, VerifiedEntry]
    refused: Mapping[str, RefusedEntry] = field(default_factory=dict)
    legacy: bool = False

    @property
    def names(self) -> frozenset[str]:
        """Every model name the document mentions, accepted or refused."""
        return frozenset(self.entries) | frozenset(self.refused)


def sign_assignment_set(
    document: AssignmentSet,
    director_keys: Sequence[Any],
    *,
    release_json: Mapping[str, bytes] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Sign ``document`` with the director key(s); return the envelope and its canonical bytes.

    ``release_json`` maps a model name to ``canonical_json`` of its entry's
    release when the caller has it (a director signing a stage of thousands
    of devices encodes each release once). Raises ``ValueError`` if the
    envelope would exceed :data:`MAX_ASSIGNMENT_BYTES` (the device would
    refuse it).
    """
    fields = document.model_dump(mode="json", by_alias=True, exclude={"models"})
    encoded = release_json or {}
    entries: dict[str, bytes] = {}
    for name, entry in document.models.items():
        entry_fields = entry.model_dump(mode="json", exclude={"release"})
        release = encoded.get(name)
        if release is None:
            release = canonical_json(entry.release)
        entries[name] = canonical_object(entry_fields, {"release": release})
    models_json = canonical_object({}, entries)
    body = canonical_object(fields, {"models": models_json})
    plain = {**fields, "models": {
        name: {**entry.model_dump(mode="json", exclude={"release"}), "release": entry.release}
        for name, entry in document.models.items()
    }}
    envelope, data = make_envelope_bytes(plain, list(director_keys), body=body)
    if len(data) > MAX_ASSIGNMENT_BYTES:
        raise ValueError(
            f"signed assignment set for {document.device_id} is {len(data)} bytes, "
            f"limit {MAX_ASSIGNMENT_BYTES}: fewer models, or smaller releases"
        )
    return envelope, data


def _pick(signed: dict[str, Any]) -> type[Strict]:
    return SignedAssignment if signed.get("schema") == ASSIGNMENT_SCHEMA else SignedAssignmentSet


def _with_units(
    entries: dict[str, VerifiedEntry], refused: dict[str, RefusedEntry],
    units: Mapping[str, str | None],
) -> None:
    """Refuse every entry of a unit one of whose members was refused."""
    failed = {units[name]: name for name in refused if units.get(name)}
    for name in [n for n in entries if units.get(n) in failed]:
        entry = entries.pop(name)
        culprit = failed[units[name]]
        refused[name] = RefusedEntry(name, entry.assignment_id, MalformedPayload(
            f"unit {units[name]!r}: {culprit} was refused ({refused[culprit].error})"
        ))


def verify_desired(
    payload: bytes,
    *,
    device_id: str,
    release_keys: KeyList,
    director_keys: KeyList,
    now: float,
    highest_sequence: int,
    hardware: Capabilities | None = None,
    device_tier: Tier | None = None,
    release_cache: MutableMapping[bytes, ReleaseManifest] | None = None,
) -> VerifiedDesired:
    """Verify a ``desired`` payload in either form (module docstring).

    Raises one :class:`ProtocolError` subclass when the document as a whole
    fails (checks A1-A8 of :mod:`.assignment`); an entry that fails its own
    checks is returned in ``refused`` instead.
    """
    check_caller(device_id, release_keys, director_keys, highest_sequence)
    signed, verified = verify_envelope(
        payload, SignedAssignmentSet, director_keys, max_bytes=MAX_ASSIGNMENT_BYTES,
        what="assignment", now=now, also_pinned=(release_keys,), pick=_pick,
    )
    document = verified.signed  # type: ignore[attr-defined]
    check_addressing(document, device_id=device_id, now=now, highest_sequence=highest_sequence)
    legacy = isinstance(document, Assignment)
    if legacy:
        raw_entries = {None: (signed["release"], document)}
    else:
        raw_entries = {name: (signed["models"][name]["release"], entry)
                       for name, entry in document.models.items()}

    entries: dict[str, VerifiedEntry] = {}
    refused: dict[str, RefusedEntry] = {}
    units: dict[str, str | None] = {}
    for claimed, (release, entry) in raw_entries.items():
        label = claimed or "model"
        units[label] = getattr(entry, "unit", None)
        try:
            manifest, variant = check_release(
                release, entry.tier, release_keys=release_keys, hardware=hardware,
                device_tier=device_tier, release_cache=release_cache,
            )
        except ProtocolError as exc:
            refused[label] = RefusedEntry(label, entry.assignment_id, exc)
            continue
        name = manifest.name if claimed is None else claimed
        if manifest.name != name:
            # The director may not run release "a" under the name "b": the name is
            # what apps ask for, and the release keys signed the other one.
            refused[name] = RefusedEntry(name, entry.assignment_id, MalformedPayload(
                f"model {name!r} is assigned release {manifest.ref}"
            ))
            continue
        model_entry = entry if not legacy else ModelEntry(
            assignment_id=entry.assignment_id, rollout_id=entry.rollout_id, tier=entry.tier,
            release=release,
        )
        entries[name] = VerifiedEntry(name, model_entry, manifest, variant)
    _with_units(entries, refused, units)
    return VerifiedDesired(
        device_id=document.device_id,
        sequence=document.sequence,
        issued_at=document.issued_at,
        expires_at=document.expires_at,
        artifact_url_base=document.artifact_url_base,
        entries=entries,
        refused=refused,
        legacy=legacy,
    )
