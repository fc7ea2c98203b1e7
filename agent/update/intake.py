"""What to do with one ``desired`` message: ignore, reject, refresh or accept.

Pure, like python-tuf's ``trusted_metadata_set``: :func:`decide` takes the
payload's bytes, the pinned keys (already loaded), the persisted update
record and the clock, and returns a :class:`Decision`; it reads no file,
sends nothing and persists nothing. :class:`agent.update.pipeline.Updater`
does the I/O around it (loading keys, saving the record, emitting events).
:func:`accepted` and :func:`refreshed` compute the record the pipeline then
saves.

The rules, in the order :func:`decide` applies them:

====  ======================================================  ========
I1    empty payload (a cleared retained message)              ignore
I2    identical to the accepted or the last refused payload   ignore
      (retained messages come again on every reconnect)
I3    the update record could not be read                     reject ``state_corrupt``
I4    no pinned keys                                          reject ``keys_unavailable``
I5    :func:`protocol.verify_assignment` refuses it           reject ``exc.reason``
      (a replayed sequence is flagged ``replay``: it says
      nothing about what this device is doing)
I6    same assignment id, release, tier and sha256 as the     refresh
      current one, higher sequence: the director re-signed
      it before expiry (no download, nothing restarts)
I7    release name or version unusable as a store key         reject ``malformed``
I8    anything else: a new update                             accept
====  ======================================================  ========

I3 and I4 come before verification because without a readable record there
is no replay floor, and without keys nothing can be verified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from protocol import (
    MAX_ASSIGNMENT_BYTES,
    Capabilities,
    EventCode,
    ProtocolError,
    ReplayError,
    Tier,
    UpdateState,
    VerifiedAssignment,
    verify_assignment,
)

from .state import UpdateFile, UpdateRecord
from .store import model_key

if TYPE_CHECKING:
    from ..trust import TrustRoots


class Action(StrEnum):
    """What the pipeline does with a ``desired`` message."""

    IGNORE = "ignore"
    REJECT = "reject"
    REFRESH = "refresh"
    ACCEPT = "accept"


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What verification needs to know about this device."""

    device_id: str
    capabilities: Capabilities
    tier: Tier


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`."""

    action: Action
    #: sha256 of the payload (empty for an empty payload)
    digest: str = ""
    #: the assignment id: verified for refresh/accept, only claimed for a rejection
    assignment_id: str | None = None
    #: the sequence: verified for refresh/accept, only claimed (or 0) for a rejection
    sequence: int = 0
    #: why a rejection: for programs and for people (``"<code>: <detail>"``)
    code: EventCode | None = None
    reason: str | None = None
    #: a rejected replay: reported, but ``hello``'s status stays as it is
    replay: bool = False
    #: the verified assignment (refresh and accept)
    verified: VerifiedAssignment | None = None
    #: the model store key of the assigned variant (accept)
    key: str | None = None


def verify(
    payload: bytes, device: DeviceFacts, trust: TrustRoots, *, now: float, highest_sequence: int
) -> VerifiedAssignment:
    """:func:`protocol.verify_assignment` for this device; raises :class:`ProtocolError`."""
    return verify_assignment(
        payload,
        device_id=device.device_id,
        release_keys=trust.release,
        director_keys=trust.director,
        now=now,
        highest_sequence=highest_sequence,
        hardware=device.capabilities,
        device_tier=device.tier,
    )


def _peek(payload: bytes) -> tuple[str | None, int]:
    """Unverified assignment id and sequence, only to label a rejection."""
    if len(payload) > MAX_ASSIGNMENT_BYTES:
        return None, 0
    try:
        signed = json.loads(payload)["signed"]
        claimed_id, sequence = signed.get("assignment_id"), signed.get("sequence")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, 0
    label = claimed_id[:128] if isinstance(claimed_id, str) and claimed_id else None
    ok_seq = isinstance(sequence, int) and not isinstance(sequence, bool) and sequence >= 0
    return label, sequence if ok_seq else 0


def _reject(payload: bytes, digest: str, code: EventCode, detail: str, *,
            replay: bool = False) -> Decision:
    claimed_id, claimed_seq = _peek(payload)
    return Decision(Action.REJECT, digest, claimed_id, claimed_seq, code, f"{code.value}: {detail}",
                    replay=replay)


def is_refresh(current: UpdateRecord, verified: VerifiedAssignment) -> bool:
    """Is ``verified`` the current assignment re-signed (rule I6)?"""
    return (
        current.assignment_id == verified.assignment.assignment_id
        and current.ref == verified.manifest.ref
        and current.tier == verified.tier
        and current.sha256 == verified.variant.sha256
    )


def decide(
    payload: bytes,
    digest: str,
    *,
    device: DeviceFacts,
    trust: TrustRoots | None,
    trust_problem: str | None,
    record: UpdateFile,
    last_rejected: str | None,
    disabled: str | None,
    now: float,
) -> Decision:
    """Apply rules I1-I8 (module docstring) to one ``desired`` payload with sha256 ``digest``.

    ``trust`` is None when the pinned keys could not be loaded
    (``trust_problem`` says why); ``disabled`` says why the update record
    could not be read, None when it could; ``last_rejected`` is the digest of
    the last payload refused.
    """
    if not payload:
        return Decision(Action.IGNORE)  # I1
    current = record.current
    if (current is not None and digest == current.payload_sha256) or digest == last_rejected:
        return Decision(Action.IGNORE, digest)  # I2
    if disabled:
        return _reject(payload, digest, EventCode.STATE_CORRUPT, disabled)  # I3
    if trust is None:
        return _reject(payload, digest, EventCode.KEYS_UNAVAILABLE, str(trust_problem))  # I4
    try:
        verified = verify(payload, device, trust, now=now,
                          highest_sequence=record.highest_sequence)
    except ProtocolError as exc:  # I5
        return _reject(payload, digest, EventCode(exc.reason), str(exc),
                       replay=isinstance(exc, ReplayError))
    assignment, manifest = verified.assignment, verified.manifest
    if current is not None and is_refresh(current, verified):
        return Decision(Action.REFRESH, digest, assignment.assignment_id, assignment.sequence,
                        verified=verified)  # I6
    try:
        key = model_key(manifest.name, manifest.version, verified.tier.value)
    except ValueError as exc:
        return Decision(Action.REJECT, digest, assignment.assignment_id, assignment.sequence,
                        EventCode.MALFORMED, f"malformed: {exc}")  # I7
    return Decision(Action.ACCEPT, digest, assignment.assignment_id, assignment.sequence,
                    verified=verified, key=key)  # I8


def accepted(payload: bytes, decision: Decision, *, update_id: str, now: float) -> UpdateFile:
    """The update file after accepting ``decision`` (an ``accept``) as update ``update_id``.

    A fresh file: the new record replaces any earlier one, and its sequence
    is the new replay floor.
    """
    verified, key = decision.verified, decision.key
    if decision.action is not Action.ACCEPT or verified is None or key is None:
        raise ValueError(f"not an accept decision: {decision.action}")
    new = UpdateRecord(
        update_id=update_id,
        assignment_id=verified.assignment.assignment_id,
        sequence=verified.assignment.sequence,
        ref=verified.manifest.ref,
        tier=verified.tier,
        key=key,
        sha256=verified.variant.sha256,
        state=UpdateState.VERIFIED,
        ts=now,
        accepted_at=now,
        payload=payload.decode(),
        payload_sha256=decision.digest,
    )
    return UpdateFile(highest_sequence=new.sequence, current=new, status=new.status())


def refreshed(record: UpdateFile, payload: bytes, decision: Decision, *, now: float) -> UpdateFile:
    """The update file after ``decision`` (a ``refresh``): new sequence and payload, same update."""
    current = record.current
    if decision.action is not Action.REFRESH or current is None:
        raise ValueError(f"not a refresh of a current update: {decision.action}")
    sequence = decision.sequence
    new = current.model_copy(update={
        "sequence": sequence,
        "payload": payload.decode(),
        "payload_sha256": decision.digest,
        # Re-verified against this time on resume: the refreshed payload's
        # issued_at may lie past the first acceptance.
        "accepted_at": now,
    })
    status = record.status
    if status is not None and status.assignment_id == current.assignment_id:
        status = status.model_copy(update={"sequence": sequence})
    return record.model_copy(
        update={"highest_sequence": sequence, "current": new, "status": status}
    )
