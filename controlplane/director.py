"""The director: signs per-device assignments and keeps them fresh.

For each device it picks the release's variant for the device's tier
(:func:`choose_tier`), takes the next number from the device's sequence
counter, signs an :class:`protocol.Assignment` with the director key(s),
stores it and asks the publisher to put it, retained, on the device's
``desired`` topic. Storing comes first and publishing is retried until the
broker acknowledges, so an assignment made while the broker is down is
delivered when it is back.

Sequence numbers come from one counter row per device, bumped with
``UPDATE ... SET last_sequence = last_sequence + 1 RETURNING`` as the first
write of the transaction that stores the assignment: PostgreSQL serialises
concurrent bumps on the row lock, SQLite on its single writer lock, so
numbers are strictly increasing per device across assignments, re-signs,
rollbacks and unassignments, whichever replica or thread issues them. A
batch of new assignments is signed before its transaction opens, with the
numbers the counters say come next, and any device whose number moved in
between is signed again inside it: what is stored is always signed with the
number the counter handed out, and the write lock is held for the writes only.

Re-signing (:meth:`Director.resign_due`) keeps ``assignment_id``, release,
tier and rollout and issues a new sequence and validity window: agents treat
that as a refresh, not a reinstall.

Python API for rollouts: :meth:`Director.assign`, :meth:`Director.unassign`,
:meth:`Director.verified_release`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Connection, Engine, Table, insert, select, update

from protocol import (
    Assignment,
    KeyList,
    ReleaseManifest,
    SigningKey,
    Tier,
    canonical_json,
    sign_assignment_bytes,
    verify_release,
)

from .db.models import AssignmentRecord, Device, DeviceSequence, ModelVersion
from .db.statuses import AssignmentStatus
from .db.writes import insert_ignoring_conflicts
from .tier_policy import RAM_BYTES, choose_tier
from .trust import DirectorKeys

log = logging.getLogger(__name__)

assignments: Table = AssignmentRecord.__table__  # type: ignore[assignment]
sequences: Table = DeviceSequence.__table__  # type: ignore[assignment]

#: re-signs per database read; the job repeats while a batch comes back full
RESIGN_BATCH = 500
#: new assignments per transaction (SQLite caps bound parameters at 32,766)
ASSIGN_BATCH = 1000

Status = Literal["assigned", "incompatible", "unknown_device", "unassigned", "not_assigned"]


class UnknownRelease(LookupError):
    """No registered release has this name and version."""


@dataclass(frozen=True)
class AssignResult:
    """What happened for one device."""

    device_id: str
    status: Status
    tier: str | None = None
    assignment_id: str | None = None
    sequence: int | None = None
    expires_at: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class _DeviceFacts:
    tier: Tier | None
    ram_bytes: int | None


def new_assignment_id() -> str:
    """A fresh id: ``a-`` and 24 hex digits (fits ``Assignment.assignment_id``)."""
    return f"a-{secrets.token_hex(12)}"


def new_assignment_ids(count: int) -> list[str]:
    """``count`` fresh ids as :func:`new_assignment_id` makes them, from one read
    of the system's random source rather than one per id."""
    pool = secrets.token_bytes(12 * count)
    return [f"a-{pool[i:i + 12].hex()}" for i in range(0, 12 * count, 12)]


def next_sequence(conn: Connection, device_id: str) -> int:
    """Allocate the device's next sequence number inside ``conn``'s transaction.

    Call it as the transaction's first write: it takes the lock that
    serialises every allocation for this device until commit.
    """
    conn.execute(
        insert_ignoring_conflicts(conn.dialect.name, sequences, ["device_id"]),
        {"device_id": device_id, "last_sequence": 0, "published_sequence": 0},
    )
    return int(
        conn.execute(
            update(sequences)
            .where(sequences.c.device_id == device_id)
            .values(last_sequence=sequences.c.last_sequence + 1)
            .returning(sequences.c.last_sequence)
        ).scalar_one()
    )


def next_sequences(conn: Connection, device_ids: Sequence[str]) -> dict[str, int]:
    """:func:`next_sequence` for many devices at once: one bump each, in ``conn``'s transaction.

    Call it as the transaction's first write. On PostgreSQL the counter rows
    are locked in device-id order first, so two batches sharing devices wait
    for each other instead of deadlocking.
    """
    ids = sorted(set(device_ids))
    conn.execute(
        insert_ignoring_conflicts(conn.dialect.name, sequences, ["device_id"]),
        [{"device_id": d, "last_sequence": 0, "published_sequence": 0} for d in ids],
    )
    if conn.dialect.name == "postgresql":
        conn.execute(
            select(sequences.c.device_id).where(sequences.c.device_id.in_(ids))
            .order_by(sequences.c.device_id).with_for_update()
        ).all()
    rows = conn.execute(
        update(sequences)
        .where(sequences.c.device_id.in_(ids))
        .values(last_sequence=sequences.c.last_sequence + 1)
        .returning(sequences.c.device_id, sequences.c.last_sequence)
    ).all()
    return {device_id: int(last) for device_id, last in rows}


def peek_next_sequences(conn: Connection, device_ids: Sequence[str]) -> dict[str, int]:
    """What :func:`next_sequences` would hand out if nobody allocated first; locks nothing.

    Lets a batch be signed before its write transaction opens. The guess is
    checked against the real allocation inside that transaction.
    """
    last = dict(conn.execute(
        select(sequences.c.device_id, sequences.c.last_sequence)
        .where(sequences.c.device_id.in_(device_ids))
    ).all())
    return {device_id: int(last.get(device_id, 0)) + 1 for device_id in device_ids}


@dataclass(frozen=True, slots=True)
class _Draft:
    """One assignment to sign and store: everything but its sequence and validity."""

    device_id: str
    tier: Tier
    assignment_id: str
    version_id: int
    ref: str
    release: dict[str, Any]
    #: ``canonical_json(release)``: encoded once for every draft that embeds it
    release_json: bytes
    rollout_id: str | None
    kind: str


@dataclass(frozen=True, slots=True)
class _CachedSigningKey(SigningKey):
    """A :class:`protocol.SigningKey` that parses its private key once.

    The base class rebuilds the key object from raw bytes for every signature
    and every key id, which is a third of the cost of signing a stage of
    thousands of assignments. Same signatures, same key id.
    """

    _private: Any = field(default=None, compare=False, repr=False)
    _key_id: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        object.__setattr__(self, "_private", Ed25519PrivateKey.from_private_bytes(self.raw))
        object.__setattr__(self, "_key_id", SigningKey(self.raw).key_id)

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, data: bytes) -> bytes:
        return bytes(self._private.sign(data))


class Director:
    """Signs, stores and hands out assignments. Thread-safe; one per process."""

    def __init__(
        self,
        engine: Engine,
        keys: DirectorKeys,
        release_keys: KeyList,
        *,
        artifact_url_base: str,
        ttl_s: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._signers = [_CachedSigningKey(key.raw) for key in keys.signers]
        self._release_keys = release_keys
        self._url_base = artifact_url_base
        self._ttl_s = ttl_s
        #: called after every commit that changes what a device should get
        self._on_change = on_change
        self._clock = clock

    # -- assigning -------------------------------------------------------------

    def _release(self, name: str, version: str) -> tuple[int, dict[str, Any], ReleaseManifest]:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(ModelVersion.id, ModelVersion.envelope).where(
                    ModelVersion.model_name == name, ModelVersion.version == version
                )
            ).one_or_none()
        if row is None:
            raise UnknownRelease(f"{name}@{version} is not registered")
        envelope = json.loads(row.envelope)
        # Re-verified on every use: the database is not a trust root, and an
        # assignment embedding a release the agents would refuse helps nobody.
        manifest = verify_release(envelope, self._release_keys, now=self._clock())
        return row.id, envelope, manifest

    def verified_release(self, name: str, version: str) -> ReleaseManifest:
        """The registered release ``name@version``, verified against the release keys.

        Raises :class:`UnknownRelease`, or :class:`protocol.ProtocolError` when
        the stored release no longer verifies (the release keys were rotated).
        """
        return self._release(name, version)[2]

    def _facts(self, device_ids: Sequence[str]) -> dict[str, _DeviceFacts]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(Device.id, Device.tier, RAM_BYTES).where(Device.id.in_(device_ids))
            ).all()
        return {device_id: _DeviceFacts(Tier(tier) if tier else None, ram)
                for device_id, tier, ram in rows}

    def assign(
        self,
        device_ids: Iterable[str],
        name: str,
        version: str,
        *,
        rollout_id: str | None = None,
    ) -> list[AssignResult]:
        """Assign ``name@version`` to each device; one result per device, in order.

        Raises :class:`UnknownRelease` if the release is not registered.
        Devices are assigned in batches of :data:`ASSIGN_BATCH`, one
        transaction each; a batch is stored whole or not at all.
        """
        ids = list(dict.fromkeys(device_ids))
        version_id, envelope, manifest = self._release(name, version)
        facts = self._facts(ids)
        results: dict[str, AssignResult] = {}
        todo: list[tuple[str, Tier]] = []
        for device_id in ids:
            fact = facts.get(device_id)
            if fact is None:
                results[device_id] = AssignResult(device_id, "unknown_device",
                                                  reason="no such device")
                continue
            tier, why = choose_tier(manifest, fact.tier, fact.ram_bytes)
            if tier is None:
                results[device_id] = AssignResult(device_id, "incompatible", reason=why)
                continue
            todo.append((device_id, tier))
        release_json = canonical_json(envelope)
        drafts = [
            _Draft(device_id, tier, assignment_id, version_id, manifest.ref, envelope,
                   release_json, rollout_id, "assign")
            for (device_id, tier), assignment_id in zip(
                todo, new_assignment_ids(len(todo)), strict=True
            )
        ]
        for start in range(0, len(drafts), ASSIGN_BATCH):
            for result in self._issue_many(drafts[start : start + ASSIGN_BATCH]):
                results[result.device_id] = result
            # Publishing starts with the first batch, while later ones are signed.
            self._on_change()
        return [results[device_id] for device_id in ids]

    def _signed_row(self, draft: _Draft, sequence: int, now: float) -> dict[str, Any]:
        """The ``assignments`` row for ``draft`` with ``sequence``, its envelope signed."""
        assignment = Assignment(
            assignment_id=draft.assignment_id,
            device_id=draft.device_id,
            rollout_id=draft.rollout_id,
            sequence=sequence,
            issued_at=now,
            expires_at=now + self._ttl_s,
            tier=draft.tier,
            release=draft.release,
            artifact_url_base=self._url_base,
        )
        _, signed = sign_assignment_bytes(assignment, self._signers,
                                          release_json=draft.release_json)
        return {
            "assignment_id": draft.assignment_id,
            "device_id": draft.device_id,
            "version_id": draft.version_id,
            "ref": draft.ref,
            "tier": draft.tier.value,
            "sequence": sequence,
            "issued_at": now,
            "expires_at": assignment.expires_at,
            "rollout_id": draft.rollout_id,
            "kind": draft.kind,
            "status": AssignmentStatus.ACTIVE,
            "ended_at": None,
            "envelope": signed.decode("utf-8"),
        }

    def _issue_many(self, drafts: Sequence[_Draft]) -> list[AssignResult]:
        """Store ``drafts`` (one per device) as the devices' live assignments, in one transaction.

        Signing is most of the work, so it happens before the transaction,
        with the sequence numbers the devices' counters say come next: on
        SQLite the transaction holds the only write lock, and the publisher
        and the ingest would wait behind every signature. Inside, the numbers
        are allocated for real; a device whose number moved meanwhile (another
        writer assigned to it) is signed again with the one it got. One commit
        (one fsync on SQLite) per batch instead of per device is what lets a
        stage of thousands of devices go out in seconds.
        """
        if not drafts:
            return []
        device_ids = [draft.device_id for draft in drafts]
        with self._engine.connect() as conn:
            guess = peek_next_sequences(conn, device_ids)
        now = self._clock()
        rows = [self._signed_row(draft, guess[draft.device_id], now) for draft in drafts]
        with self._engine.begin() as conn:
            sequence = next_sequences(conn, device_ids)
            moved = 0
            for i, draft in enumerate(drafts):
                if sequence[draft.device_id] != rows[i]["sequence"]:
                    rows[i] = self._signed_row(draft, sequence[draft.device_id], now)
                    moved += 1
            conn.execute(
                update(assignments)
                .where(assignments.c.device_id.in_(device_ids),
                       assignments.c.status == AssignmentStatus.ACTIVE)
                .values(status=AssignmentStatus.SUPERSEDED, ended_at=now)
            )
            conn.execute(insert(assignments), rows)
        if moved:
            log.debug("%d of %d assignment(s) signed again: sequence moved", moved, len(rows))
        log.info("assign %s -> %d device(s)", drafts[0].ref, len(rows))
        return [_assigned(row) for row in rows]

    def _issue(self, draft: _Draft, *, replaces: int) -> AssignResult:
        """Re-sign ``draft`` as the device's live assignment if row ``replaces`` still is."""
        with self._engine.begin() as conn:
            sequence = next_sequence(conn, draft.device_id)
            now = self._clock()
            # A re-sign applies only if that row is still the live one; a new
            # assignment made meanwhile wins.
            ended = conn.execute(
                update(assignments)
                .where(assignments.c.id == replaces,
                       assignments.c.status == AssignmentStatus.ACTIVE)
                .values(status=AssignmentStatus.SUPERSEDED, ended_at=now)
            ).rowcount
            if ended != 1:
                conn.rollback()
                return AssignResult(draft.device_id, "not_assigned", reason="replaced meanwhile")
            row = self._signed_row(draft, sequence, now)
            conn.execute(insert(assignments), row)
        log.info("%s %s -> %s (%s, seq %d)", draft.kind, draft.ref, draft.device_id,
                 draft.tier.value, sequence)
        return _assigned(row)

    def unassign(self, device_ids: Iterable[str]) -> list[AssignResult]:
        """Revoke each device's live assignment; the publisher clears its ``desired``.

        The device keeps serving what it runs; it just has nothing pending.
        """
        results = []
        for device_id in dict.fromkeys(device_ids):
            with self._engine.begin() as conn:
                # Bumped even though nothing is signed: the publisher owes the
                # device a (clearing) message until this number is acknowledged.
                next_sequence(conn, device_id)
                revoked = conn.execute(
                    update(assignments)
                    .where(assignments.c.device_id == device_id,
                           assignments.c.status == AssignmentStatus.ACTIVE)
                    .values(status=AssignmentStatus.REVOKED, ended_at=self._clock())
                ).rowcount
                if not revoked:
                    conn.rollback()
            results.append(
                AssignResult(device_id, "unassigned" if revoked else "not_assigned")
            )
        if any(r.status == "unassigned" for r in results):
            self._on_change()
        return results

    # -- re-signing -------------------------------------------------------------

    def resign_due(self, margin_s: float, *, batch: int = RESIGN_BATCH) -> int:
        """Re-sign live assignments with less than ``margin_s`` left; return how many."""
        now = self._clock()
        with self._engine.connect() as conn:
            due = conn.execute(
                select(
                    assignments.c.id,
                    assignments.c.device_id,
                    assignments.c.assignment_id,
                    assignments.c.version_id,
                    assignments.c.ref,
                    assignments.c.tier,
                    assignments.c.rollout_id,
                    assignments.c.envelope,
                )
                .where(assignments.c.status == AssignmentStatus.ACTIVE,
                       assignments.c.expires_at < now + margin_s)
                .order_by(assignments.c.expires_at)
                .limit(batch)
            ).all()
        done = 0
        for row in due:
            # The release exactly as embedded before: same bytes, same signatures.
            release = json.loads(row.envelope)["signed"]["release"]
            result = self._issue(
                _Draft(row.device_id, Tier(row.tier), row.assignment_id, row.version_id,
                       row.ref, release, canonical_json(release), row.rollout_id, "refresh"),
                replaces=row.id,
            )
            done += result.status == "assigned"
        if done:
            log.info("re-signed %d assignment(s)", done)
            self._on_change()
        return done


def _assigned(row: dict[str, Any]) -> AssignResult:
    """The result reported for a stored assignment row."""
    return AssignResult(
        row["device_id"], "assigned", tier=row["tier"], assignment_id=row["assignment_id"],
        sequence=row["sequence"], expires_at=row["expires_at"],
    )


RESIGN_JOB_ID = "resign-assignments"


def add_resign_job(
    scheduler: BaseScheduler, director: Director, *, margin_s: float, interval_s: float
) -> None:
    """Run :meth:`Director.resign_due` every ``interval_s`` seconds on ``scheduler``."""

    def job() -> None:
        # Drain in batches so a backlog (after downtime) clears in one run.
        while director.resign_due(margin_s) >= RESIGN_BATCH:
            pass

    scheduler.add_job(
        job,
        "interval",
        seconds=interval_s,
        id=RESIGN_JOB_ID,
        replace_existing=True,
        # First run at start-up: after downtime, assignments may be close to expiry.
        next_run_time=datetime.now(UTC),
    )
