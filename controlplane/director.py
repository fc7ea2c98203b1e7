"""The director: signs each device's desired state and keeps it fresh.

A device's desired state is one document listing every model it should
run, one entry per model name (:mod:`.documents`). Assigning a release to a
device changes the entry of the release's name and leaves the others as
they are; removing a model drops its entry; either way the director signs
the device's whole document again with the next number from the device's
sequence counter (:mod:`.sequences`), stores it and asks the publisher to
put it, retained, on the device's ``desired`` topic. Storing comes first
and publishing is retried until the broker acknowledges, so an assignment
made while the broker is down is delivered when it is back.

A device whose agent reads one model (its last hello was
``slmfleet.hello/1``, or it never said hello) gets the old single-model
form of its one entry; a second model for it is refused
(``needs_upgrade``), since its agent could not read the document.

A batch of devices is signed before its transaction opens, with the
numbers and entries the database shows then. Inside, the numbers are
allocated for real (the counter row lock serialises every writer of a
device) and the entries read again; a device whose number or entries moved
in between is planned and signed again: what is stored is always signed
with the number the counter handed out, over the entries live at commit,
and the write lock is held for the writes only.

Re-signing (:meth:`Director.resign_due`) keeps every entry's
``assignment_id``, release, tier and rollout and issues a new sequence and
validity window: agents treat that as a refresh, not a reinstall.

Python API for rollouts: :meth:`Director.assign`, :meth:`Director.remove`,
:meth:`Director.unassign`, :meth:`Director.verified_release`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update

from protocol import (
    KeyList,
    LockOverride,
    ReleaseManifest,
    SigningKey,
    Tier,
    canonical_json,
    verify_release,
)

from .db.models import AssignmentRecord, DesiredDocument, Device, ModelVersion
from .db.statuses import AssignmentStatus
from .db.writes import insert_ignoring_conflicts
from .documents import (
    SINGLE,
    Entry,
    Release,
    ReleaseCache,
    Signed,
    forms,
    live_entries,
    sign,
)
from .plans import AssignResult, Change, Plan, Status, plan_change
from .policy_defaults import policies_for
from .sequences import next_sequence, next_sequences, peek_next_sequences
from .tier_policy import RAM_BYTES, choose_tier
from .trust import DirectorKeys
from .update_policies import PolicyLayer, stored, with_lock_override

__all__ = [
    "AssignResult", "Director", "Status", "UnknownRelease", "add_resign_job", "new_assignment_id",
    "new_assignment_ids", "next_sequence", "next_sequences", "peek_next_sequences",
]

log = logging.getLogger(__name__)

assignments: Table = AssignmentRecord.__table__  # type: ignore[assignment]
documents: Table = DesiredDocument.__table__  # type: ignore[assignment]

#: re-signs per database read; the job repeats while a batch comes back full
RESIGN_BATCH = 500
#: devices per transaction (SQLite caps bound parameters at 32,766)
ASSIGN_BATCH = 1000

class UnknownRelease(LookupError):
    """No registered release has this name and version."""


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
    """Signs, stores and hands out desired-state documents. Thread-safe; one per process."""

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
        self._releases = ReleaseCache()

    # -- releases and devices --------------------------------------------------------

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
        found: dict[str, _DeviceFacts] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(device_ids), ASSIGN_BATCH):
                for device_id, tier, ram in conn.execute(
                    select(Device.id, Device.tier, RAM_BYTES)
                    .where(Device.id.in_(device_ids[start : start + ASSIGN_BATCH]))
                ):
                    found[device_id] = _DeviceFacts(Tier(tier) if tier else None, ram)
        return found

    # -- the Python API ---------------------------------------------------------------

    def assign(
        self,
        device_ids: Iterable[str],
        name: str,
        version: str,
        *,
        rollout_id: str | None = None,
        policy: PolicyLayer | None = None,
    ) -> list[AssignResult]:
        """Make ``name@version`` each device's entry for model ``name``; one result per device.

        Each entry's update policy is the device's defaults (label,
        profile) with ``policy`` (a rollout's) over them, signed into the
        entry. The devices' other models keep their entries. Raises
        :class:`UnknownRelease` if the release is not registered. Devices are
        signed in batches of :data:`ASSIGN_BATCH`, one transaction each; a
        batch is stored whole or not at all.
        """
        ids = list(dict.fromkeys(device_ids))
        version_id, envelope, manifest = self._release(name, version)
        release = Release(version_id, manifest.ref, envelope, canonical_json(envelope))
        self._releases.put(release)
        facts = self._facts(ids)
        with self._engine.connect() as conn:
            policies = policies_for(conn, ids, policy)
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
        changes = [
            Change(device_id, manifest.name, Entry(manifest.name, assignment_id, release, tier,
                                                    rollout_id, policies.get(device_id)))
            for (device_id, tier), assignment_id in zip(
                todo, new_assignment_ids(len(todo)), strict=True
            )
        ]
        results.update(self._apply_all(changes))
        log.info("assign %s -> %d device(s)", manifest.ref,
                 sum(r.status == "assigned" for r in results.values()))
        return [results[device_id] for device_id in ids]

    def remove(self, device_ids: Iterable[str], name: str) -> list[AssignResult]:
        """Take model ``name`` off each device: its next document leaves the name out.

        An agent reading sets unloads the model (and keeps its files for a
        rollback until garbage collection); a device in the old form with no
        model left has its ``desired`` cleared. ``not_assigned`` where the
        device had no entry of that name.
        """
        ids = list(dict.fromkeys(device_ids))
        results = self._apply_all([Change(d, name) for d in ids])
        return [results[d] for d in ids]

    def unassign(self, device_ids: Iterable[str]) -> list[AssignResult]:
        """Revoke every entry of each device; the publisher clears its ``desired``.

        The device keeps serving what it runs; it just has nothing pending.
        """
        ids = list(dict.fromkeys(device_ids))
        results = self._apply_all([Change(d, clear=True) for d in ids])
        return [results[d] for d in ids]

    def override_lock(self, device_id: str, name: str, override: LockOverride) -> AssignResult:
        """Put ``override`` into the policy of the device's entry for model ``name`` and
        re-sign its document: same assignment id, a refresh for the agent, whose
        update locks taken before ``override.issued_at`` then no longer defer it.
        ``not_assigned`` where the device has no entry of that name."""
        with self._engine.connect() as conn:
            entry = live_entries(conn, [device_id], self._releases).get(device_id, {}).get(name)
        if entry is None:
            return AssignResult(device_id, "not_assigned", reason=f"{name} is not assigned")
        new = replace(entry, policy=with_lock_override(entry.policy, override))
        return self._apply_all([Change(device_id, name, new, keeps_id=True)])[device_id]

    def resign_due(self, margin_s: float, *, batch: int = RESIGN_BATCH) -> int:
        """Re-sign the documents with less than ``margin_s`` left; return how many."""
        with self._engine.connect() as conn:
            due = list(conn.execute(
                select(documents.c.device_id)
                .where(documents.c.envelope.is_not(None),
                       documents.c.expires_at < self._clock() + margin_s)
                .order_by(documents.c.expires_at)
                .limit(batch)
            ).scalars())
        done = sum(r.status == "assigned" for r in self._apply_all([Change(d) for d in due])
                   .values())
        if done:
            log.info("re-signed %d document(s)", done)
        return done

    # -- signing and storing ----------------------------------------------------------

    def _apply_all(self, changes: Sequence[Change]) -> dict[str, AssignResult]:
        results: dict[str, AssignResult] = {}
        for start in range(0, len(changes), ASSIGN_BATCH):
            part = self._apply(changes[start : start + ASSIGN_BATCH])
            results.update(part)
            if any(r.status in ("assigned", "unassigned") for r in part.values()):
                # Publishing starts with the first batch, while later ones are signed.
                self._on_change()
        return results

    def _sign(self, device_id: str, plan: Plan, sequence: int, now: float) -> Signed:
        return sign(device_id, plan.form, plan.entries, sequence=sequence, now=now,
                    ttl_s=self._ttl_s, signers=self._signers, artifact_url_base=self._url_base)

    def _apply(self, changes: Sequence[Change]) -> dict[str, AssignResult]:
        """Sign and store the next document of each device in ``changes`` (one each), in
        one transaction.

        Signing is most of the work, so it happens before the transaction,
        with the numbers and entries read then: on SQLite the transaction
        holds the only write lock, and the publisher and the ingest would
        wait behind every signature. Inside, the numbers are allocated for
        real; a device whose number moved meanwhile (another writer got
        there first) has its entries read again, and is planned and signed
        again. The form its agent reads is not re-read: a hello that changes
        it bumps nothing, and the device's next document follows it. One
        commit (one fsync on SQLite) per batch instead of per device is what
        lets a stage of thousands of devices go out in seconds.
        """
        ids = [c.device_id for c in changes]
        with self._engine.connect() as conn:
            # The counters first: every change to a device's entries bumps its
            # counter in the same commit, so a device whose number is still the
            # one peeked here when it is allocated had no change in between.
            guess = peek_next_sequences(conn, ids)
            current = live_entries(conn, ids, self._releases)
            reads = forms(conn, ids)
        now = self._clock()
        results: dict[str, AssignResult] = {}
        plans: dict[str, Plan] = {}
        for change in changes:
            plan, refused = plan_change(change, current.get(change.device_id, {}),
                                        reads.get(change.device_id, SINGLE))
            if plan is None:
                assert refused is not None
                results[change.device_id] = refused
                continue
            plan.signed = self._sign(change.device_id, plan, guess[change.device_id], now)
            plans[change.device_id] = plan
        if not plans:
            return results
        with self._engine.begin() as conn:
            sequence = next_sequences(conn, list(plans))
            moved = [d for d in plans if sequence[d] != guess[d]]
            # Another writer got to these devices first: plan again on the
            # entries live now (read under the counters' lock) and sign again.
            fresh = live_entries(conn, moved, self._releases) if moved else {}
            for device_id in moved:
                live, reads_now = fresh.get(device_id, {}), plans[device_id].reads
                plan, refused = plan_change(plans[device_id].change, live, reads_now)
                if plan is None:
                    # Its number is taken: what is live now is signed with it.
                    plan = plan_change(Change(device_id), live, reads_now)[0]
                    assert plan is not None and refused is not None
                    results[device_id] = refused
                plan.signed = self._sign(device_id, plan, sequence[device_id], now)
                plans[device_id] = plan
            self._store(conn, plans, now)
        if moved:
            log.debug("%d of %d document(s) signed again: another writer came first",
                      len(moved), len(plans))
        for device_id, plan in plans.items():
            results.setdefault(device_id, _result(device_id, plan))
        return results

    def _store(self, conn: Connection, plans: Mapping[str, Plan], now: float) -> None:
        """Write each plan's document and entry rows; retire the rows they replace."""
        ids = list(plans)
        # A model taken off (or every model, cleared) is revoked, not superseded.
        live = assignments.c.status == AssignmentStatus.ACTIVE
        revoke = {"status": AssignmentStatus.REVOKED, "ended_at": now}
        removed = [{"b_d": d, "b_m": p.change.model_name}
                   for d, p in plans.items() if p.change.kind == "remove"]
        if removed:
            conn.execute(
                update(assignments).where(assignments.c.device_id == bindparam("b_d"),
                                          assignments.c.model_name == bindparam("b_m"), live)
                .values(**revoke), removed)
        cleared = [{"b_d": d} for d, p in plans.items() if p.change.kind == "clear"]
        if cleared:
            conn.execute(
                update(assignments).where(assignments.c.device_id == bindparam("b_d"), live)
                .values(**revoke), cleared)
        for start in range(0, len(ids), ASSIGN_BATCH):
            conn.execute(
                update(assignments)
                .where(assignments.c.device_id.in_(ids[start : start + ASSIGN_BATCH]),
                       assignments.c.status == AssignmentStatus.ACTIVE)
                .values(status=AssignmentStatus.SUPERSEDED, ended_at=now)
            )
        rows = [_row(d, plan, entry) for d, plan in plans.items()
                for entry in plan.entries.values()]
        if rows:
            conn.execute(insert(assignments), rows)
        signed = [{"device_id": d, "envelope": p.signed.envelope,
                   "expires_at": p.signed.expires_at,
                   "form": p.signed.form if p.signed.envelope else None}
                  for d, p in plans.items() if p.signed is not None]
        # Every device here has a counter row (bumped above) but maybe no document yet.
        conn.execute(insert_ignoring_conflicts(conn.dialect.name, documents, ["device_id"]),
                     [{"device_id": row["device_id"]} for row in signed])
        conn.execute(
            update(documents).where(documents.c.device_id == bindparam("b_d"))
            .values(envelope=bindparam("b_envelope"), expires_at=bindparam("b_expires"),
                    form=bindparam("b_form")),
            [{"b_d": r["device_id"], "b_envelope": r["envelope"], "b_expires": r["expires_at"],
              "b_form": r["form"]} for r in signed],
        )


def _row(device_id: str, plan: Plan, entry: Entry) -> dict[str, Any]:
    """The ``assignments`` row of ``entry`` in ``plan``'s signed document."""
    signed = plan.signed
    assert signed is not None and signed.expires_at is not None
    changed = (plan.change.kind == "assign" and plan.change.model_name == entry.model_name
               and not plan.change.keeps_id)
    return {
        "assignment_id": entry.assignment_id,
        "device_id": device_id,
        "version_id": entry.release.version_id,
        "model_name": entry.model_name,
        "ref": entry.release.ref,
        "tier": entry.tier.value,
        "sequence": signed.sequence,
        "issued_at": signed.issued_at,
        "expires_at": signed.expires_at,
        "rollout_id": entry.rollout_id,
        "kind": "assign" if changed else "refresh",
        "status": AssignmentStatus.ACTIVE,
        "ended_at": None,
        "envelope": None,
        "policy": stored(entry.policy),
    }


def _result(device_id: str, plan: Plan) -> AssignResult:
    """The result reported for a stored plan."""
    signed = plan.signed
    assert signed is not None
    kind = plan.change.kind
    if kind in ("remove", "clear"):
        return AssignResult(device_id, "unassigned", sequence=signed.sequence,
                            expires_at=signed.expires_at)
    entry = plan.entries.get(plan.change.model_name or "")
    return AssignResult(
        device_id, "assigned", tier=entry.tier.value if entry else None,
        assignment_id=entry.assignment_id if entry else None,
        sequence=signed.sequence, expires_at=signed.expires_at,
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
