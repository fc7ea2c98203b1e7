"""A device's desired-state document: its entries, read from the database, and signed.

A device's live ``assignments`` rows (one per model name) are the entries
of the document the director signs for it. The form follows what its agent
reads (``devices.assignment_form``): a device whose last hello was
``slmfleet.hello/2`` gets an :class:`protocol.AssignmentSet` naming every
entry (an empty one when it should run nothing); any other device gets the
old single-model :class:`protocol.Assignment` of its one entry, or nothing
(its ``desired`` cleared) when it has none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, select

from protocol import (
    Assignment,
    AssignmentSet,
    ModelEntry,
    SigningKey,
    Tier,
    UpdatePolicy,
    canonical_json,
    sign_assignment_bytes,
    sign_assignment_set,
)

from .db.models import AssignmentRecord, Device, ModelVersion
from .db.statuses import AssignmentStatus
from .update_policies import loaded

Form = Literal["single", "set"]
SINGLE: Form = "single"
SET: Form = "set"

#: ids per statement where a list of device ids is bound
CHUNK = 1000
#: releases kept encoded; a fleet runs few at a time
RELEASE_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Release:
    """A registered release as a document embeds it: envelope and canonical bytes."""

    version_id: int
    ref: str
    envelope: dict[str, Any]
    #: ``canonical_json(envelope)``: encoded once for every document that embeds it
    canonical: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One model name's entry: what the device should run under that name."""

    model_name: str
    assignment_id: str
    release: Release
    tier: Tier
    rollout_id: str | None
    #: when and how fast it may update, signed into the entry; None: any time, uncapped
    policy: UpdatePolicy | None = None


@dataclass(frozen=True, slots=True)
class Signed:
    """A device's document, signed: what is stored and published."""

    sequence: int
    issued_at: float
    expires_at: float | None
    form: Form
    #: canonical JSON of the signed envelope; None: clear ``desired``
    envelope: str | None


class ReleaseCache:
    """Registered releases by version id, decoded and encoded once.

    Releases are immutable once registered, so an entry never goes stale; the
    cache only bounds its size. Not locked: a lost race just decodes twice.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, Release] = {}

    def put(self, release: Release) -> None:
        """Remember ``release``."""
        if len(self._by_id) >= RELEASE_CACHE_SIZE:
            self._by_id.clear()
        self._by_id[release.version_id] = release

    def get(self, conn: Connection, version_ids: Iterable[int]) -> dict[int, Release]:
        """The releases of ``version_ids``, reading only those not cached yet."""
        wanted = set(version_ids)
        missing = sorted(wanted - set(self._by_id))
        if missing:
            for vid, name, version, text in conn.execute(
                select(ModelVersion.id, ModelVersion.model_name, ModelVersion.version,
                       ModelVersion.envelope).where(ModelVersion.id.in_(missing))
            ):
                envelope = json.loads(text)
                self.put(Release(vid, f"{name}@{version}", envelope, canonical_json(envelope)))
        return {vid: self._by_id[vid] for vid in wanted if vid in self._by_id}


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def live_entries(
    conn: Connection, device_ids: Sequence[str], releases: ReleaseCache
) -> dict[str, dict[str, Entry]]:
    """Each device's live entries by model name (devices with none are left out)."""
    A = AssignmentRecord
    rows = []
    for chunk in _chunks(device_ids):
        rows.extend(conn.execute(
            select(A.device_id, A.model_name, A.assignment_id, A.version_id, A.tier,
                   A.rollout_id, A.policy)
            .where(A.device_id.in_(chunk), A.status == AssignmentStatus.ACTIVE)
        ).all())
    known = releases.get(conn, {row.version_id for row in rows})
    found: dict[str, dict[str, Entry]] = {}
    for row in rows:
        found.setdefault(row.device_id, {})[row.model_name] = Entry(
            row.model_name, row.assignment_id, known[row.version_id], Tier(row.tier),
            row.rollout_id, loaded(row.policy),
        )
    return found


def forms(conn: Connection, device_ids: Sequence[str]) -> dict[str, Form]:
    """The form each device's agent reads (``single`` for one never heard from)."""
    found: dict[str, Form] = {}
    for chunk in _chunks(device_ids):
        for device_id, form in conn.execute(
            select(Device.id, Device.assignment_form).where(Device.id.in_(chunk))
        ):
            found[device_id] = SET if form == SET else SINGLE
    return found


def sign(
    device_id: str,
    form: Form,
    entries: Mapping[str, Entry],
    *,
    sequence: int,
    now: float,
    ttl_s: float,
    signers: Sequence[SigningKey],
    artifact_url_base: str,
) -> Signed:
    """Sign ``entries`` as the device's document numbered ``sequence``.

    ``single`` with one entry: the old form; with none: nothing (clear
    ``desired``). ``set``: every entry, possibly none, each with its policy.
    Raises ``ValueError`` for ``single`` with several entries or an entry with
    a policy (the old form has no place for one; the caller decides before),
    or a document over the size limit.
    """
    expires_at = now + ttl_s
    if form == SINGLE:
        if not entries:
            return Signed(sequence, now, None, form, None)
        if len(entries) > 1:
            raise ValueError(f"{device_id} reads one model; {len(entries)} given")
        (entry,) = entries.values()
        if entry.policy is not None:
            raise ValueError(f"{device_id} reads one model, with no place for an update policy")
        assignment = Assignment(
            assignment_id=entry.assignment_id, device_id=device_id, rollout_id=entry.rollout_id,
            sequence=sequence, issued_at=now, expires_at=expires_at, tier=entry.tier,
            release=entry.release.envelope, artifact_url_base=artifact_url_base,
        )
        _, data = sign_assignment_bytes(assignment, signers, release_json=entry.release.canonical)
    else:
        document = AssignmentSet(
            device_id=device_id, sequence=sequence, issued_at=now, expires_at=expires_at,
            artifact_url_base=artifact_url_base,
            models={name: ModelEntry(assignment_id=e.assignment_id, rollout_id=e.rollout_id,
                                     tier=e.tier, release=e.release.envelope, policy=e.policy)
                    for name, e in entries.items()},
        )
        _, data = sign_assignment_set(
            document, signers,
            release_json={name: e.release.canonical for name, e in entries.items()},
        )
    return Signed(sequence, now, expires_at, form, data.decode("utf-8"))
