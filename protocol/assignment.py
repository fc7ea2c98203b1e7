"""Assignments: what one device should run now, signed by the director key.

An :class:`Assignment` names a device, a tier and a release, and embeds that
release's envelope *verbatim*, still signed by the offline release keys. The
control plane's online director key signs the assignment and re-signs it on
a schedule before it expires (DESIGN.md "Trust: two signatures").

:func:`verify_assignment` is the agent's acceptance check, the analogue of
python-tuf's ``TrustedMetadataSet``: fed the retained ``desired`` payload,
the pinned key lists, the clock and the highest sequence ever accepted, it
either returns a :class:`VerifiedAssignment` or raises one
:class:`~protocol.errors.ProtocolError` subclass per failed check. Steps, in
order (cited as A1..A11 in the code):

A1  size cap                      :class:`PayloadTooLarge`
A2  JSON and envelope shape       :class:`MalformedPayload`
A3  pinned key lists not expired  :class:`KeyListExpired`
A4  director threshold            :class:`ThresholdError`
A5  assignment schema             :class:`SchemaMismatch` / :class:`MalformedPayload`
A6  addressed to this device      :class:`WrongDeviceError`
A7  not expired, not from the future :class:`ExpiredError` / :class:`NotYetValidError`
A8  sequence above highest seen   :class:`ReplayError`
A9  release threshold + schema    :class:`ThresholdError` / :class:`MalformedPayload`
A10 release has the tier          :class:`VariantMismatch`
A11 variant fits tier and RAM     :class:`DoesNotFit`

Nothing signed is interpreted before its signature verifies (A4 before A5,
A9 before the manifest is read), and the cheap, local checks (A6-A8) come
before the second round of signature work.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, StringConstraints, model_validator

from .canonical import canonical_json, canonical_object
from .errors import (
    DoesNotFit,
    ExpiredError,
    NotYetValidError,
    ReplayError,
    VariantMismatch,
    WrongDeviceError,
)
from .fit import ram_needed_bytes
from .keys import (
    KeyList,
    PositiveInt,
    Signatures,
    SignedPart,
    Timestamp,
    make_envelope_bytes,
    verify_envelope,
)
from .manifest import ReleaseManifest, Variant, verify_release
from .messages import MAX_PAYLOAD_BYTES, Capabilities, DeviceId, Strict, Tier
from .signing import SigningKey
from .topics import is_valid_device_id

ASSIGNMENT_SCHEMA = "slmfleet.assignment/1"

#: The one payload allowed past the 64 KiB cap of every other message
#: (DESIGN.md): a ``desired`` document embeds whole signed releases, one per
#: model the device runs (:mod:`.assignment_set`), each up to
#: MAX_RELEASE_BYTES. 256 KiB holds a set of typical releases (a few KiB
#: each) up to :data:`~protocol.assignment_set.MAX_MODELS`; the director
#: refuses to sign a larger one. Still a small, bounded read for the agent
#: before it parses anything.
MAX_ASSIGNMENT_BYTES = 4 * MAX_PAYLOAD_BYTES

#: How far ``issued_at`` may lie ahead of the device's clock. Covers ordinary
#: NTP drift between device and control plane; an assignment from further in
#: the future means one of the clocks is wrong, and accepting it would let an
#: assignment outlive its intended validity window. Agents should verify only
#: once the clock is synchronised (boards without an RTC boot in the past).
CLOCK_SKEW_S = 300.0

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
AssignmentId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]


class Assignment(SignedPart):
    """What one device should run now: a tier of a release, until ``expires_at``.

    Re-signing before expiry must raise ``sequence`` (the agent accepts only a
    higher one); the agent treats a higher sequence with the same release and
    tier as a refresh, not a new install. Rolling back to an older model is
    likewise a new assignment with a higher sequence.
    """

    schema_: Literal["slmfleet.assignment/1"] = Field(ASSIGNMENT_SCHEMA, alias="schema")
    assignment_id: AssignmentId
    device_id: DeviceId
    rollout_id: AssignmentId | None = None
    sequence: PositiveInt
    issued_at: Timestamp
    expires_at: Timestamp
    #: the tier of the chosen variant in ``release``
    tier: Tier
    #: the SignedRelease envelope exactly as the release signers produced it:
    #: kept as raw JSON so re-serialising a model can never disturb the bytes
    #: its signatures cover; verified by :func:`verify_release`
    release: dict[str, Any]
    #: where to fetch artifacts (``<base>/<variant.artifact>``); None: agent default
    artifact_url_base: (
        Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://[!-~]+$")] | None
    ) = None

    @model_validator(mode="after")
    def _window(self) -> Assignment:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class SignedAssignment(Strict):
    """Envelope of an assignment, signed by a threshold of director keys."""

    signed: Assignment
    signatures: Signatures


@dataclass(frozen=True, slots=True)
class VerifiedAssignment:
    """An assignment that passed every check, with its release and chosen variant."""

    assignment: Assignment
    manifest: ReleaseManifest
    variant: Variant

    @property
    def tier(self) -> Tier:
        """The tier of the chosen variant."""
        return self.assignment.tier


def sign_assignment(
    assignment: Assignment, director_key: SigningKey | Sequence[SigningKey]
) -> dict[str, Any]:
    """Sign ``assignment`` with the director key(s); return the envelope as a plain dict.

    Raises ``ValueError`` if the envelope would exceed
    :data:`MAX_ASSIGNMENT_BYTES` (the device would refuse it).
    """
    return sign_assignment_bytes(assignment, director_key)[0]


def sign_assignment_bytes(
    assignment: Assignment,
    director_key: SigningKey | Sequence[SigningKey],
    *,
    release_json: bytes | None = None,
) -> tuple[dict[str, Any], bytes]:
    """:func:`sign_assignment`, and the envelope's canonical JSON: what is published.

    ``release_json`` is ``canonical_json(assignment.release)`` when the caller
    has it already: the release is most of an assignment's bytes, and a
    director signing a stage of thousands of devices encodes it once instead
    of once per device (the signed bytes are the same either way).
    """
    keys = [director_key] if isinstance(director_key, SigningKey) else list(director_key)
    fields = assignment.model_dump(mode="json", by_alias=True, exclude={"release"})
    if release_json is None:
        release_json = canonical_json(assignment.release)
    body = canonical_object(fields, {"release": release_json})
    envelope, data = make_envelope_bytes({**fields, "release": assignment.release}, keys,
                                         body=body)
    if len(data) > MAX_ASSIGNMENT_BYTES:
        raise ValueError(f"signed assignment is {len(data)} bytes, limit {MAX_ASSIGNMENT_BYTES}")
    return envelope, data


#: releases a :func:`verify_assignment` cache holds before it starts over
RELEASE_CACHE_SIZE = 64


def _verified_release(
    release: Any, release_keys: KeyList,
    cache: MutableMapping[bytes, ReleaseManifest] | None,
) -> ReleaseManifest:
    if cache is None:
        return verify_release(release, release_keys)
    try:
        key = canonical_json(release)
    except (TypeError, ValueError):
        return verify_release(release, release_keys)  # refused there, with the reason
    manifest = cache.get(key)
    if manifest is None:
        manifest = verify_release(release, release_keys)
        if len(cache) >= RELEASE_CACHE_SIZE:
            cache.clear()
        cache[key] = manifest
    return manifest


class _Addressed(Protocol):
    device_id: str
    sequence: int
    issued_at: float
    expires_at: float


def check_addressing(
    document: _Addressed, *, device_id: str, now: float, highest_sequence: int
) -> None:
    """Checks A6-A8 on a verified document: this device's, in its window, not a replay.

    Shared by the single assignment and the set document (:mod:`.assignment_set`).
    """
    # A6: a valid assignment for another device must not install here
    # (retained messages can be misrouted; ACLs are not the only guard).
    if document.device_id != device_id:
        raise WrongDeviceError(f"assignment is for {document.device_id!r}, not {device_id!r}")

    # A7: freeze attack: an attacker who withholds newer assignments can only
    # keep this one alive until it expires. And no issuing from the future:
    # that would stretch the window the director meant to grant.
    if document.expires_at <= now:
        raise ExpiredError(f"assignment expired at {document.expires_at}, now {now}")
    if document.issued_at > now + CLOCK_SKEW_S:
        raise NotYetValidError(
            f"assignment issued at {document.issued_at}, more than {CLOCK_SKEW_S:g} s "
            f"after now ({now})"
        )

    # A8: rollback/replay: an old, still-valid assignment (or the current one
    # again) must not move the device; a deliberate rollback gets a new sequence.
    if document.sequence <= highest_sequence:
        raise ReplayError(
            f"sequence {document.sequence} is not above the highest accepted, {highest_sequence}"
        )


def check_release(
    release: Any,
    tier: Tier,
    *,
    release_keys: KeyList,
    hardware: Capabilities | None = None,
    device_tier: Tier | None = None,
    release_cache: MutableMapping[bytes, ReleaseManifest] | None = None,
) -> tuple[ReleaseManifest, Variant]:
    """Checks A9-A11 on one embedded release: signed, has ``tier``, fits the device."""
    # A9: the release keys, not the director, vouch for what the model is: a
    # compromised control plane alone cannot make a device run an unsigned
    # model. Verified over the raw embedded envelope, not the parsed model.
    manifest = _verified_release(release, release_keys, release_cache)

    # A10: the director chose a tier; the release must actually have it.
    variant = manifest.variants.get(tier)
    if variant is None:
        have = ", ".join(sorted(t.value for t in manifest.variants))
        raise VariantMismatch(f"{manifest.ref} has no {tier.value} variant (has: {have})")

    # A11: the variant must fit this device: never a tier above the device's,
    # and never more RAM than it has (DESIGN.md: "the variant fits its
    # measured hardware").
    if device_tier is not None and device_tier.rank < tier.rank:
        raise DoesNotFit(f"{tier.value} variant on a {device_tier.value} device")
    if hardware is not None:
        ram_needed = ram_needed_bytes(variant)
        if ram_needed > hardware.ram_bytes:
            raise DoesNotFit(
                f"{manifest.ref} {tier.value} needs {ram_needed} bytes of RAM, "
                f"device has {hardware.ram_bytes}"
            )
    return manifest, variant


def check_caller(
    device_id: str, release_keys: KeyList, director_keys: KeyList, highest_sequence: int
) -> None:
    # Caller misuse, not bad remote data: ValueError (STYLE.md item 3).
    if release_keys.role != "release" or director_keys.role != "director":
        raise ValueError(
            "pass the release key list as release_keys, the director's as director_keys"
        )
    # A key in both lists would let the online director sign releases too,
    # which is exactly what the two-signature split exists to prevent.
    if set(release_keys.keys) & set(director_keys.keys):
        raise ValueError("release and director key lists share a key")
    if not is_valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    if highest_sequence < 0:
        raise ValueError("highest_sequence must not be negative")


def verify_assignment(
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
) -> VerifiedAssignment:
    """Run checks A1-A11 (module docstring) on a ``desired`` payload.

    ``highest_sequence`` is the highest sequence this device ever accepted
    (0 before the first); the caller persists the new one only after acting
    on the result. ``device_tier``, when given, must rank at least the
    assigned tier; ``hardware``, when given, must have the RAM the variant
    needs (:func:`protocol.fit.ram_needed_bytes`). Disk is left to
    :func:`protocol.fit.fit_check` right before downloading, when the agent
    knows what it can clean up.

    ``release_cache`` (optional, one per pinned release key list) keeps
    releases already verified, by the canonical bytes of their envelope: a
    process that checks assignments for many devices at once (the fleet
    simulator) verifies each release's signatures once, not once per device.
    Every other check still runs on every call.
    """
    check_caller(device_id, release_keys, director_keys, highest_sequence)
    # A1 + A2: bound the read before parsing, then split the envelope without
    # interpreting anything inside 'signed'.
    # A3: a pinned key list past its expiry is a frozen trust root; rotate first.
    # A4: the director vouches for this exact object (raw, not re-serialised).
    # A5: only then interpret it; unknown fields and foreign schemas are refused.
    signed, verified = verify_envelope(
        payload, SignedAssignment, director_keys, max_bytes=MAX_ASSIGNMENT_BYTES,
        what="assignment", now=now, also_pinned=(release_keys,),
    )
    assignment = verified.signed
    check_addressing(assignment, device_id=device_id, now=now,
                     highest_sequence=highest_sequence)
    manifest, variant = check_release(
        signed["release"], assignment.tier, release_keys=release_keys, hardware=hardware,
        device_tier=device_tier, release_cache=release_cache,
    )
    return VerifiedAssignment(assignment=assignment, manifest=manifest, variant=variant)
