"""What to do with one ``desired`` message: ignore, reject, refresh or accept.

Pure, like python-tuf's ``trusted_metadata_set``: :func:`decide` takes the
payload's bytes, the pinned keys (already loaded), the persisted update
file and the clock, and returns a :class:`Decision`; it reads no file,
sends nothing and persists nothing. :class:`agent.update.pipeline.Updater`
does the I/O around it (loading keys, the set's fit check, saving the
file, emitting events). :func:`accepted` and :func:`refreshed` compute the
file the pipeline then saves.

A ``desired`` payload is one document naming every model the device should
run (``slmfleet.assignment/2``; the single-model form reads as a set of
one). The rules, in the order :func:`decide` applies them:

====  ======================================================  ========
I1    empty payload (a cleared retained message)              ignore
I2    identical to the accepted or the last refused payload   ignore
      (retained messages come again on every reconnect)
I3    the update file could not be read                       reject ``state_corrupt``
I4    no pinned keys                                          reject ``keys_unavailable``
I5    :func:`protocol.verify_desired` refuses the document    reject ``exc.reason``
      (a replayed sequence is flagged ``replay``: it says
      nothing about what this device is doing)
I6    no entry of the document stands (each was refused, or   reject, the first
      the one of the single-model form was)                   refusal's code
I7    every entry is its name's current one re-signed, and    refresh
      no name left the set: the director re-signed it
      before expiry (no download, nothing restarts)
I8    anything else                                           accept, per entry:
====  ======================================================  ========

and per model name, when the document is accepted (:class:`EntryPlan`):

====  ======================================================  ========
E1    the entry failed its own checks (release signature,     rejected ``exc.reason``
      tier, fit for this hardware; a unit fails together)
E2    release name or version unusable as a store key         rejected ``malformed``
E2a   a new adapter whose base is not active here, or is      rejected ``base_mismatch``
      another build than the one it was made for (rules
      B1-B4 of :mod:`protocol.adapter`; before any download);
      in a unit, the base its unit brings counts as active,
      and the unit's new members are refused with it
E3    same assignment id, release, tier and sha256 as the     refresh
      name's record (and not a removal)
E4    anything else                                           new update
E5    a name with a record, absent from the document          remove
====  ======================================================  ========

I3 and I4 come before verification because without a readable file there
is no replay floor, and without keys nothing can be verified.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from protocol import (
    MAX_ASSIGNMENT_BYTES,
    ActiveBase,
    BaseMismatch,
    Capabilities,
    EventCode,
    ProtocolError,
    ReplayError,
    Tier,
    UpdateState,
    VerifiedDesired,
    VerifiedEntry,
    check_base,
    verify_desired,
)

from .adapters import bases_for, incoming_bases
from .state import DocumentRecord, EntryRecord, UpdateFile
from .store import model_key

if TYPE_CHECKING:
    from ..trust import TrustRoots


class Action(StrEnum):
    """What the pipeline does with a ``desired`` message."""

    IGNORE = "ignore"
    REJECT = "reject"
    REFRESH = "refresh"
    ACCEPT = "accept"


class Change(StrEnum):
    """What an accepted document means for one model name (rules E1-E5)."""

    REJECTED = "rejected"
    REFRESH = "refresh"
    NEW = "new"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What verification needs to know about this device."""

    device_id: str
    capabilities: Capabilities
    tier: Tier


@dataclass(frozen=True, slots=True)
class EntryPlan:
    """One model name's part of an accepted document."""

    name: str
    change: Change
    #: the entry's assignment id (for a removal: the one of the entry it ends)
    assignment_id: str
    #: the verified entry (refresh and new)
    entry: VerifiedEntry | None = None
    #: the model store key of the assigned variant (new)
    key: str | None = None
    code: EventCode | None = None
    reason: str | None = None
    #: the entry's unit (members are accepted and refused together)
    entry_unit: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`."""

    action: Action
    #: sha256 of the payload (empty for an empty payload)
    digest: str = ""
    #: the assignment ids: verified for refresh/accept, only claimed for a rejection
    assignment_ids: tuple[str, ...] = ()
    #: the sequence: verified for refresh/accept, only claimed (or 0) for a rejection
    sequence: int = 0
    #: why a rejection: for programs and for people (``"<code>: <detail>"``)
    code: EventCode | None = None
    reason: str | None = None
    #: a rejected replay: reported, but ``hello``'s status stays as it is
    replay: bool = False
    #: the verified document (refresh and accept)
    verified: VerifiedDesired | None = None
    #: per model name (accept), by name
    plans: tuple[EntryPlan, ...] = ()

    @property
    def assignment_id(self) -> str | None:
        """The first assignment id (the only one of a single-model document)."""
        return self.assignment_ids[0] if self.assignment_ids else None

    def changed(self) -> list[EntryPlan]:
        """The plans that end their name's earlier record (all but refreshes)."""
        return [plan for plan in self.plans if plan.change is not Change.REFRESH]


def verify(
    payload: bytes, device: DeviceFacts, trust: TrustRoots, *, now: float, highest_sequence: int
) -> VerifiedDesired:
    """:func:`protocol.verify_desired` for this device; raises :class:`ProtocolError`."""
    return verify_desired(
        payload,
        device_id=device.device_id,
        release_keys=trust.release,
        director_keys=trust.director,
        now=now,
        highest_sequence=highest_sequence,
        hardware=device.capabilities,
        device_tier=device.tier,
    )


def _peek(payload: bytes) -> tuple[tuple[str, ...], int]:
    """Unverified assignment ids and sequence, only to label a rejection."""
    if len(payload) > MAX_ASSIGNMENT_BYTES:
        return (), 0
    try:
        signed = json.loads(payload)["signed"]
        sequence = signed.get("sequence")
        models = signed.get("models")
        if isinstance(models, dict):
            claimed = [entry.get("assignment_id") for entry in list(models.values())[:8]
                       if isinstance(entry, dict)]
        else:
            claimed = [signed.get("assignment_id")]
    except (ValueError, TypeError, KeyError, AttributeError):
        return (), 0
    labels = tuple(c[:128] for c in claimed if isinstance(c, str) and c)
    ok_seq = isinstance(sequence, int) and not isinstance(sequence, bool) and sequence >= 0
    return labels, sequence if ok_seq else 0


def _reject(payload: bytes, digest: str, code: EventCode, detail: str, *,
            replay: bool = False) -> Decision:
    claimed_ids, claimed_seq = _peek(payload)
    return Decision(Action.REJECT, digest, claimed_ids, claimed_seq, code,
                    f"{code.value}: {detail}", replay=replay)


def is_refresh(record: EntryRecord, entry: VerifiedEntry) -> bool:
    """Is ``entry`` the name's current entry re-signed (rule E3)?"""
    return (
        not record.remove
        and record.assignment_id == entry.assignment_id
        and record.ref == entry.manifest.ref
        and record.tier == entry.tier
        and record.sha256 == entry.variant.sha256
    )


def _base_refusal(name: str, entry: VerifiedEntry,
                  active: Mapping[str, ActiveBase]) -> EntryPlan | None:
    """Rule E2a: a new adapter's base must be the one active here."""
    try:
        check_base(entry.manifest, entry.tier, active)
    except BaseMismatch as exc:
        return EntryPlan(name, Change.REJECTED, entry.assignment_id,
                         code=EventCode.BASE_MISMATCH, reason=f"base_mismatch: {exc}",
                         entry_unit=entry.entry.unit)
    return None


def _plan(verified: VerifiedDesired, record: UpdateFile,
          active: Mapping[str, ActiveBase]) -> list[EntryPlan]:
    plans = []
    incoming = incoming_bases(verified.entries)
    for name, refused in verified.refused.items():  # E1
        code = EventCode(refused.error.reason)
        plans.append(EntryPlan(name, Change.REJECTED, refused.assignment_id, code=code,
                               reason=f"{code.value}: {refused.error}"))
    for name, entry in verified.entries.items():
        manifest = entry.manifest
        try:
            key = model_key(manifest.name, manifest.version, entry.tier.value)
        except ValueError as exc:  # E2
            plans.append(EntryPlan(name, Change.REJECTED, entry.assignment_id,
                                   code=EventCode.MALFORMED, reason=f"malformed: {exc}"))
            continue
        current = record.models.get(name)
        change = Change.REFRESH if current is not None and is_refresh(current, entry) else (
            Change.NEW)  # E3, E4
        if change is Change.NEW and (
                refusal := _base_refusal(name, entry, bases_for(entry, active, incoming))):
            plans.append(refusal)  # E2a
            continue
        plans.append(EntryPlan(name, change, entry.assignment_id, entry=entry, key=key,
                               entry_unit=entry.entry.unit))
    for name, current in record.models.items():
        if name not in verified.names and not current.remove:  # E5
            plans.append(EntryPlan(name, Change.REMOVE, current.assignment_id))
    return sorted(_unit_refusals(plans), key=lambda plan: plan.name)


def _unit_refusals(plans: list[EntryPlan]) -> list[EntryPlan]:
    """E2a for a unit: the new members of a unit whose adapter was refused go with it."""
    refused = {p.entry_unit: p for p in plans if p.code is EventCode.BASE_MISMATCH and p.entry_unit}
    return [EntryPlan(p.name, Change.REJECTED, p.assignment_id, code=EventCode.BASE_MISMATCH,
                      reason=f"base_mismatch: unit {p.entry_unit!r}: {refused[p.entry_unit].name} "
                             f"was refused ({refused[p.entry_unit].reason})")
            if p.change is Change.NEW and p.entry_unit in refused else p for p in plans]


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
    active: Mapping[str, ActiveBase] | None = None,
) -> Decision:
    """Apply rules I1-I8 and E1-E5 (module docstring) to one ``desired`` payload.

    ``digest`` is the payload's sha256; ``trust`` is None when the pinned
    keys could not be loaded (``trust_problem`` says why); ``disabled`` says
    why the update file could not be read, None when it could;
    ``last_rejected`` is the digest of the last payload refused; ``active``
    what the device serves now, by name (what an adapter's base is checked against).
    """
    if not payload:
        return Decision(Action.IGNORE)  # I1
    document = record.document
    if (document is not None and digest == document.payload_sha256) or digest == last_rejected:
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
    plans = tuple(_plan(verified, record, active or {}))
    ids = tuple(plan.assignment_id for plan in plans if plan.change is not Change.REMOVE)
    if not any(plan.entry is not None for plan in plans) and any(
        plan.change is Change.REJECTED for plan in plans
    ):  # I6
        first = next(plan for plan in plans if plan.change is Change.REJECTED)
        return Decision(Action.REJECT, digest, ids, verified.sequence, first.code, first.reason)
    action = Action.REFRESH if record.document is not None and all(
        plan.change is Change.REFRESH for plan in plans) else Action.ACCEPT  # I7, I8
    return Decision(action, digest, ids, verified.sequence, verified=verified, plans=plans)


def _entry_record(plan: EntryPlan, sequence: int, update_id: str, now: float,
                  previous: EntryRecord | None) -> EntryRecord:
    if plan.change is Change.REMOVE:
        assert previous is not None
        return previous.model_copy(update={
            "update_id": update_id, "sequence": sequence, "remove": True,
            "state": UpdateState.VERIFIED, "reason": None, "ts": now, "resumes": 0,
        })
    entry = plan.entry
    return EntryRecord(
        name=plan.name,
        update_id=update_id,
        assignment_id=plan.assignment_id,
        sequence=sequence,
        ref=entry.manifest.ref if entry is not None else None,
        tier=entry.tier if entry is not None else None,
        key=plan.key,
        sha256=entry.variant.sha256 if entry is not None else None,
        unit=entry.entry.unit if entry is not None else None,
        state=UpdateState.REJECTED if plan.change is Change.REJECTED else UpdateState.FIT_CHECKED,
        reason=plan.reason,
        ts=now,
    )


def accepted(
    record: UpdateFile, payload: bytes, decision: Decision, *,
    update_ids: Callable[[], str], now: float,
) -> UpdateFile:
    """The update file after accepting ``decision`` (an ``accept``).

    Each new entry gets an update id from ``update_ids`` and starts
    ``fit_checked`` (the set's fit check runs before anything is saved); a
    refreshed one keeps its update; a removal is a new update of its name.
    The document's sequence is the new replay floor.
    """
    verified = decision.verified
    if decision.action is not Action.ACCEPT or verified is None:
        raise ValueError(f"not an accept decision: {decision.action}")
    models = dict(record.models)
    for plan in decision.plans:
        previous = models.get(plan.name)
        if plan.change is Change.REFRESH and previous is not None:
            models[plan.name] = previous.model_copy(update={"sequence": verified.sequence})
        else:
            models[plan.name] = _entry_record(plan, verified.sequence, update_ids(), now,
                                              previous)
    document = DocumentRecord(sequence=verified.sequence, payload=payload.decode(),
                              payload_sha256=decision.digest, accepted_at=now,
                              legacy=verified.legacy)
    return UpdateFile(highest_sequence=verified.sequence, document=document, models=models)


def refreshed(record: UpdateFile, payload: bytes, decision: Decision, *, now: float) -> UpdateFile:
    """The update file after ``decision`` (a ``refresh``): new sequence and payload."""
    document = record.document
    if decision.action is not Action.REFRESH or document is None:
        raise ValueError(f"not a refresh of an accepted document: {decision.action}")
    sequence = decision.sequence
    models = {name: r.model_copy(update={"sequence": sequence}) if not r.remove else r
              for name, r in record.models.items()}
    # Verified again against this time on resume: the refreshed payload's
    # issued_at may lie past the first acceptance.
    new = document.model_copy(update={"sequence": sequence, "payload": payload.decode(),
                                      "payload_sha256": decision.digest, "accepted_at": now})
    return record.model_copy(
        update={"highest_sequence": sequence, "document": new, "models": models, "status": None}
    )
