"""The rollout engine: one tick moves every live rollout as far as it may go.

A tick, per rollout, in this order:

1. **Join** devices the target matches and the rollout does not know yet
   (new devices, or ones that reported their tier since): each gets its
   cohort key and its variant tier (:func:`controlplane.tier_policy.choose_tier`),
   or is listed ``incompatible`` with the reason. A device another live
   rollout of the same model still drives is taken over (that membership
   becomes ``superseded``).
2. **Observe**: each assigned device's update outcome, read from the events
   it reported for its assignment id (``activated``, ``failed``,
   ``rejected``; ``health_passed`` / ``health_failed``). A fit-check
   rejection makes it ``incompatible``, not failed. An assignment this
   rollout issued but did not record (the process died in between) is
   adopted, not issued twice.
3. **Judge** the gates of the current stage over every device assigned so
   far (:mod:`.gates`). A failed gate pauses or rolls back at once, without
   waiting for the bake time.
4. **Assign** the current stage's cohort: online devices in it that have
   no assignment yet, within ``max_concurrent_downloads``. Offline ones are
   assigned when they are back (the retained ``desired`` would reach them
   anyway, but a device that is away must not hold a download slot).
5. **Advance** once the stage is fully assigned, none of its devices is
   still updating, the bake time is over and every gate passes; or wait for
   an operator's approval when the next stage asks for one.

Rollback sends each device the rollout touched a new, higher-sequence
assignment of the version it ran when it joined (or clears its assignment
when it ran nothing of this model), through the director like any other
assignment. Everything is read from and written to the database, so a
restarted control plane resumes exactly where the last committed tick left
it: stage advances are conditional on the rollout's revision, and a device
is assigned only from ``pending``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.orm import Session

from controlplane.db import telemetry_aggregates
from controlplane.db.models import (
    AssignmentRecord,
    Device,
    DeviceEvent,
    DeviceLabel,
    RolloutDevice,
)
from controlplane.db.telemetry_aggregates import Aggregate
from controlplane.director import Director, UnknownRelease
from controlplane.tier_policy import RAM_BYTES, choose_tier
from protocol import ProtocolError, Tier

from . import store
from .cohort import cohort_key, stage_size
from .gates import GateResult, MemberView, evaluate, overall
from .spec import RolloutSpec

log = logging.getLogger(__name__)

#: devices joined per rollout per tick; the rest join on the next ticks
JOIN_BATCH = 20_000
#: rollback reasons that mean "this device cannot run it", not "it is broken"
_INCOMPATIBLE_REASONS = ("insufficient_ram", "insufficient_disk", "variant_mismatch",
                         "does_not_fit", "no_variant")
_FINAL_EVENTS = ("activated", "failed", "rejected", "rolled_back")


def _now() -> float:
    return time.time()


class RolloutEngine:
    """Evaluates live rollouts; :meth:`tick` is the whole job. Thread-safe (one tick at a time)."""

    def __init__(
        self,
        engine: Engine,
        director: Director,
        *,
        clock: Callable[[], float] = _now,
    ) -> None:
        self._engine = engine
        self._director = director
        self._clock = clock
        self._lock = threading.Lock()
        self.ticks = 0

    # -- the tick ------------------------------------------------------------------

    def tick(self) -> None:
        """Evaluate every live rollout once, oldest first."""
        with self._lock:
            with self._engine.connect() as conn:
                ids = conn.execute(
                    select(store.rollouts.c.id)
                    .where(store.rollouts.c.state.in_(store.LIVE))
                    .order_by(store.rollouts.c.created_at)
                ).scalars().all()
            for rollout_id in ids:
                try:
                    self._step(rollout_id)
                except Exception:
                    # One broken rollout must not stall the others; it is
                    # retried next tick from what was committed.
                    log.exception("rollout %s: tick failed", rollout_id)
            self.ticks += 1

    def _load(self, rollout_id: str) -> Any:
        with self._engine.connect() as conn:
            return conn.execute(
                select(store.rollouts).where(store.rollouts.c.id == rollout_id)
            ).one()

    def _step(self, rollout_id: str) -> None:
        row = self._load(rollout_id)
        spec = RolloutSpec.model_validate(row.spec)
        if row.state == "rolling_back":
            self._rollback(row, spec)
            return
        try:
            manifest = self._director.verified_release(spec.model, spec.version)
        except (UnknownRelease, ProtocolError) as exc:
            if row.state == "active":
                self._fail(row, f"the release cannot be assigned any more: {exc}", [], spec,
                           action="pause")
            return
        self._join(row, spec, manifest)
        self._observe(row)
        if row.state in ("paused", "awaiting_approval"):
            return  # a paused rollout sends nothing new
        members = self._members(row.id)
        assigned = [m for m in members if m.stage_index is not None
                    and m.state not in ("incompatible", "superseded")]
        if row.state == "active":
            results = self._judge(row, spec, assigned)
            if overall(results) == "fail":
                failed = [r for r in results if r.verdict == "fail"]
                why = "; ".join(r.describe() for r in failed)
                # The devices' own words say what went wrong on them.
                said = [f"{m.device_id}: {m.reason}" for m in assigned
                        if m.state == "failed" and m.reason][:3]
                if said:
                    why += " — " + "; ".join(said)
                self._fail(row, why, results, spec, action=spec.on_failure)
                return
        else:
            results = []
        self._assign(row, spec, members)
        if row.state == "active":
            self._maybe_advance(row, spec, results)

    # -- 1. join -------------------------------------------------------------------

    def _matching(self, spec: RolloutSpec, conn: Any) -> list[str]:
        """Ids of the devices the target selects, in id order."""
        query = select(Device.id).where(Device.tier.is_not(None))
        target = spec.target
        if target.tiers:
            query = query.where(Device.tier.in_([t.value for t in target.tiers]))
        if target.profiles:
            query = query.where(Device.profile.in_(target.profiles))
        if target.device_ids:
            query = query.where(Device.id.in_(target.device_ids))
        for key, value in target.labels.items():
            query = query.where(
                select(DeviceLabel.device_id).where(
                    DeviceLabel.device_id == Device.id, DeviceLabel.key == key,
                    DeviceLabel.value == value,
                ).exists()
            )
        return list(conn.execute(query.order_by(Device.id)).scalars())

    def _join(self, row: Any, spec: RolloutSpec, manifest: Any) -> None:
        now = self._clock()
        with self._engine.begin() as conn:
            known = set(conn.execute(
                select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == row.id)
            ).scalars())
            # Ids first: every tick asks, and only newcomers need their reports read.
            new_ids = [d for d in self._matching(spec, conn) if d not in known][:JOIN_BATCH]
            if not new_ids:
                return
            new = []
            for chunk in _chunks(new_ids, 500):
                new.extend(conn.execute(
                    select(Device.id, Device.tier, RAM_BYTES.label("ram_bytes"),
                           Device.active_model).where(Device.id.in_(chunk))
                ).all())
            new.sort(key=lambda d: d.id)
            rows = []
            for device in new:
                tier, why = choose_tier(manifest, Tier(device.tier), device.ram_bytes)
                active = device.active_model or {}
                previous = (f"{active['name']}@{active['version']}"
                            if active.get("name") == spec.model else None)
                rows.append({
                    "rollout_id": row.id,
                    "device_id": device.id,
                    "device_tier": device.tier,
                    "variant_tier": tier.value if tier else None,
                    "cohort_key": cohort_key(row.id, device.id),
                    "state": "pending" if tier else "incompatible",
                    "stage_index": None,
                    "assignment_id": None,
                    "assigned_at": None,
                    "previous_ref": previous,
                    "health": None,
                    "reason": None if tier else why,
                    "updated_at": now,
                })
            conn.execute(insert(store.members), rows)
            # Take the devices over from older live rollouts of the same model.
            others = select(store.rollouts.c.id).where(
                store.rollouts.c.model_name == spec.model, store.rollouts.c.id != row.id,
                store.rollouts.c.state.in_(store.LIVE),
                store.rollouts.c.created_at <= row.created_at,
            )
            ids = [r["device_id"] for r in rows if r["state"] == "pending"]
            for chunk in _chunks(ids, 500):
                conn.execute(
                    update(store.members)
                    .where(store.members.c.rollout_id.in_(others),
                           store.members.c.device_id.in_(chunk),
                           store.members.c.state.in_(("pending", "assigned")))
                    .values(state="superseded", reason=f"taken over by rollout {row.id}",
                            updated_at=now)
                )
            incompatible = sum(r["state"] == "incompatible" for r in rows)
            store.record(
                conn, row.id, "devices_joined",
                f"{len(rows)} device(s) matched the target"
                + (f", {incompatible} of them incompatible" if incompatible else ""),
                stage_index=row.stage_index,
                details={"devices": len(rows), "incompatible": incompatible},
                now=now,
            )

    # -- 2. observe ----------------------------------------------------------------

    def _members(self, rollout_id: str) -> list[Any]:
        with self._engine.connect() as conn:
            return list(conn.execute(
                select(store.members).where(store.members.c.rollout_id == rollout_id)
                .order_by(store.members.c.cohort_key)
            ).all())

    def _observe(self, row: Any) -> None:
        now = self._clock()
        members = self._members(row.id)
        pending = [m for m in members if m.state == "pending"]
        watching = [m for m in members if m.state == "assigned" and m.assignment_id]
        with self._engine.begin() as conn:
            # Adopt assignments this rollout issued but never recorded (a crash
            # between the director's commit and ours); none issued, none to adopt.
            issued = pending and conn.execute(
                select(AssignmentRecord.id).where(AssignmentRecord.rollout_id == row.id).limit(1)
            ).first() is not None
            for chunk in _chunks([m.device_id for m in pending] if issued else [], 500):
                for rec in conn.execute(
                    select(AssignmentRecord.device_id, AssignmentRecord.assignment_id,
                           AssignmentRecord.issued_at)
                    .where(AssignmentRecord.rollout_id == row.id,
                           AssignmentRecord.status == "active",
                           AssignmentRecord.device_id.in_(chunk))
                ).all():
                    conn.execute(
                        update(store.members)
                        .where(store.members.c.rollout_id == row.id,
                               store.members.c.device_id == rec.device_id,
                               store.members.c.state == "pending")
                        .values(state="assigned", assignment_id=rec.assignment_id,
                                assigned_at=rec.issued_at, stage_index=row.stage_index,
                                updated_at=now)
                    )
            by_assignment = {m.assignment_id: m for m in watching}
            events: dict[str, list[Any]] = {}
            for chunk in _chunks(list(by_assignment), 500):
                for ev in conn.execute(
                    select(DeviceEvent.assignment_id, DeviceEvent.type, DeviceEvent.reason)
                    .where(DeviceEvent.assignment_id.in_(chunk))
                    .order_by(DeviceEvent.ts, DeviceEvent.id)
                ).all():
                    events.setdefault(ev.assignment_id, []).append(ev)
            for assignment_id, evs in events.items():
                member = by_assignment[assignment_id]
                values = _outcome(evs)
                if values and any(getattr(member, k) != v for k, v in values.items()):
                    conn.execute(
                        update(store.members)
                        .where(store.members.c.rollout_id == row.id,
                               store.members.c.device_id == member.device_id,
                               store.members.c.assignment_id == assignment_id)
                        .values(**values, updated_at=now)
                    )

    # -- 3. judge --------------------------------------------------------------------

    def _judge(self, row: Any, spec: RolloutSpec, assigned: Sequence[Any]) -> list[GateResult]:
        gates = spec.gates_for(row.stage_index)
        views = [MemberView(m.device_id, m.device_tier, m.state, m.health) for m in assigned]
        new_by_tier: dict[str, Aggregate] = {}
        old_by_tier: dict[str, Aggregate] = {}
        needs_metrics = any(v is not None for v in (
            gates.max_p95_latency_ratio, gates.min_tokens_per_s_ratio, gates.max_error_rate,
            gates.max_crashes))
        if needs_metrics and assigned:
            new_by_tier, old_by_tier = self._metrics(row, spec, assigned)
        results = evaluate(gates, views, new_by_tier, old_by_tier)
        public = [r.public() for r in results]
        if public != row.last_gates:
            with self._engine.begin() as conn:
                conn.execute(update(store.rollouts).where(store.rollouts.c.id == row.id)
                             .values(last_gates=public))
        return results

    def _metrics(
        self, row: Any, spec: RolloutSpec, assigned: Sequence[Any]
    ) -> tuple[dict[str, Aggregate], dict[str, Aggregate]]:
        since = row.created_at
        mine = [m.device_id for m in assigned if m.state == "succeeded"]
        tiers = sorted({m.device_tier for m in assigned if m.device_tier})
        with Session(self._engine) as session:
            new_rows = telemetry_aggregates.telemetry_rows(session, since=since, device_ids=mine) \
                if mine else []
            base_rows = telemetry_aggregates.telemetry_rows(session, since=since, tiers=tiers)
        on_new = set(mine)
        new = telemetry_aggregates.aggregate(new_rows, model=spec.model)
        old = telemetry_aggregates.aggregate(
            [(d, t, inf) for d, t, inf in base_rows if d not in on_new], model=spec.model
        )
        new_by_tier = {tier: agg for (_, v, tier), agg in new.items()
                       if v == spec.version and tier}
        old_by_tier: dict[str, Aggregate] = {}
        for (_, v, tier), agg in sorted(old.items(), key=lambda kv: str(kv[0])):
            if v != spec.version and tier:
                # Several old versions in one tier: the baseline is the busiest.
                best = old_by_tier.get(tier)
                if best is None or agg.requests > best.requests:
                    old_by_tier[tier] = agg
        return new_by_tier, old_by_tier

    def _fail(self, row: Any, why: str, results: Sequence[GateResult], spec: RolloutSpec,
              *, action: str) -> None:
        details = {"gates": [r.public() for r in results], "action": action}
        stage = row.stage_index + 1
        with self._engine.begin() as conn:
            new_state = "rolling_back" if action == "rollback" else "paused"
            done = store.transition(
                conn, row, {"state": new_state, "reason": f"stage {stage}: {why}"},
                kind="gate_failed", reason=f"stage {stage}: {why}; action: {action}",
                details=details, now=self._clock(),
            )
        if done:
            log.warning("rollout %s: stage %d failed: %s (%s)", row.id, stage, why, action)
            if action == "rollback":
                self._rollback(self._load(row.id), spec)

    # -- 4. assign -------------------------------------------------------------------

    def _online(self, members: Sequence[Any]) -> set[str]:
        """Which of ``members``' devices are online now (in chunks: SQLite caps
        the parameters of one statement)."""
        online: set[str] = set()
        with self._engine.connect() as conn:
            for chunk in _chunks([m.device_id for m in members], 500):
                online.update(conn.execute(
                    select(Device.id).where(Device.online.is_(True), Device.id.in_(chunk))
                ).scalars())
        return online

    def _assign(self, row: Any, spec: RolloutSpec, members: Sequence[Any]) -> None:
        percent = 100.0 if row.state == "completed" else spec.stages[row.stage_index].percent
        pending = [m for m in _cohort(members, percent) if m.state == "pending"]
        if not pending:
            return
        online = self._online(pending)
        todo = [m for m in pending if m.device_id in online]
        if spec.max_concurrent_downloads is not None:
            busy = sum(m.state == "assigned" for m in members)
            todo = todo[: max(0, spec.max_concurrent_downloads - busy)]
        if not todo:
            return
        # An operator may have paused since this tick read the rollout.
        if self._load(row.id).revision != row.revision:
            return
        results = self._director.assign(
            [m.device_id for m in todo], spec.model, spec.version, rollout_id=row.id
        )
        now = self._clock()
        with self._engine.begin() as conn:
            # One executemany per outcome, not one statement per device: a
            # stage of thousands of devices is recorded in one round trip each.
            m = store.members.c
            assigned = [{"d": r.device_id, "a": r.assignment_id} for r in results
                        if r.status == "assigned"]
            if assigned:
                conn.execute(
                    update(store.members)
                    .where(m.rollout_id == row.id, m.device_id == bindparam("d"),
                           m.state == "pending")
                    .values(state="assigned", assignment_id=bindparam("a"), assigned_at=now,
                            stage_index=row.stage_index, updated_at=now),
                    assigned,
                )
            # unknown_device (deleted meanwhile) is left out: the row goes with it.
            refused = [{"d": r.device_id, "r": r.reason} for r in results
                       if r.status == "incompatible"]
            if refused:
                conn.execute(
                    update(store.members)
                    .where(m.rollout_id == row.id, m.device_id == bindparam("d"),
                           m.state == "pending")
                    .values(state="incompatible", reason=bindparam("r"), updated_at=now),
                    refused,
                )
            sent = sum(r.status == "assigned" for r in results)
            if sent:
                store.record(
                    conn, row.id, "assigned",
                    f"assigned {spec.model}@{spec.version} to {sent} device(s) of stage "
                    f"{row.stage_index + 1} ({percent:g} %)",
                    stage_index=row.stage_index,
                    details={"devices": [r.device_id for r in results
                                         if r.status == "assigned"][:100]},
                    now=now,
                )

    # -- 5. advance ----------------------------------------------------------------

    def _maybe_advance(self, row: Any, spec: RolloutSpec, results: Sequence[GateResult]) -> None:
        members = self._members(row.id)
        stage = spec.stages[row.stage_index]
        cohort = _cohort(members, stage.percent)
        if not cohort:
            return
        online = self._online(cohort)
        waiting = [m for m in cohort if m.state == "pending" and m.device_id in online]
        updating = [m for m in cohort if m.state == "assigned"]
        now = self._clock()
        baked = row.stage_started_at is not None and now - row.stage_started_at >= stage.bake_s
        if waiting or updating or not baked or overall(results) != "pass":
            return
        gates = [r.public() for r in results]
        last = row.stage_index == len(spec.stages) - 1
        with self._engine.begin() as conn:
            if last:
                store.transition(
                    conn, row, {"state": "completed",
                                "reason": "every stage passed its gates"},
                    kind="completed",
                    reason=f"stage {row.stage_index + 1} (100 %) passed its gates; "
                           "devices that join or return later get the release too",
                    details={"gates": gates}, now=now,
                )
                return
            nxt = row.stage_index + 1
            needs_approval = spec.stages[nxt].approval and row.approved_stage < nxt
            values: dict[str, Any] = {
                "stage_index": nxt,
                "stage_started_at": None if needs_approval else now,
                "state": "awaiting_approval" if needs_approval else "active",
                "reason": f"waiting for approval of stage {nxt + 1}" if needs_approval else None,
                "last_gates": None,
            }
            store.transition(
                conn, row, values,
                kind="awaiting_approval" if needs_approval else "stage_started",
                reason=f"stage {row.stage_index + 1} ({stage.percent:g} %) passed its gates "
                       f"after {now - row.stage_started_at:.1f} s; "
                       + (f"stage {nxt + 1} ({spec.stages[nxt].percent:g} %) needs approval"
                          if needs_approval else
                          f"starting stage {nxt + 1} ({spec.stages[nxt].percent:g} %)"),
                details={"gates": gates}, now=now,
            )

    # -- rollback ------------------------------------------------------------------

    def _rollback(self, row: Any, spec: RolloutSpec) -> None:
        """Send every device this rollout assigned back to what it ran before; then finish."""
        members = [m for m in self._members(row.id)
                   if m.state in ("assigned", "succeeded", "failed")]
        by_previous: dict[str | None, list[str]] = {}
        for m in members:
            by_previous.setdefault(m.previous_ref, []).append(m.device_id)
        notes = []
        for previous, device_ids in sorted(by_previous.items(), key=lambda kv: str(kv[0])):
            outcome = self._send_back(previous, device_ids, row.id)
            notes.append(outcome)
            now = self._clock()
            with self._engine.begin() as conn:
                for chunk in _chunks(device_ids, 500):
                    conn.execute(
                        update(store.members)
                        .where(store.members.c.rollout_id == row.id,
                               store.members.c.device_id.in_(chunk))
                        .values(state="rolled_back", reason=outcome, updated_at=now)
                    )
        with self._engine.begin() as conn:
            store.transition(
                conn, row, {"state": "rolled_back", "reason": row.reason},
                kind="rolled_back",
                reason=(f"{len(members)} device(s) sent back: " + "; ".join(notes))
                if members else "no device had been assigned; nothing to send back",
                details={"devices": len(members)}, now=self._clock(),
            )
        log.warning("rollout %s rolled back (%d device(s))", row.id, len(members))

    def _send_back(self, previous: str | None, device_ids: list[str], rollout_id: str) -> str:
        if previous is None:
            self._director.unassign(device_ids)
            return f"{len(device_ids)} without a previous version: assignment cleared"
        name, _, version = previous.partition("@")
        try:
            results = self._director.assign(device_ids, name, version, rollout_id=rollout_id)
        except (UnknownRelease, ProtocolError) as exc:
            # The old release is gone or no longer verifies: the best left is
            # to stop pushing the new one; agents keep what they run.
            self._director.unassign(device_ids)
            return f"{len(device_ids)} to {previous} impossible ({exc}): assignment cleared"
        sent = sum(r.status == "assigned" for r in results)
        return f"{sent} of {len(device_ids)} reassigned {previous}"


def _outcome(events: Sequence[Any]) -> dict[str, Any]:
    """A member's state, health and reason from its assignment's events, in order."""
    values: dict[str, Any] = {}
    for ev in events:
        if ev.type == "health_passed":
            values["health"] = "passed"
        elif ev.type == "health_failed":
            values["health"] = "failed"
        if ev.type in _FINAL_EVENTS:
            if ev.type == "activated":
                values["state"], values["reason"] = "succeeded", None
            elif ev.type == "rejected" and any(
                r in (ev.reason or "") for r in _INCOMPATIBLE_REASONS
            ):
                values["state"], values["reason"] = "incompatible", ev.reason
            else:
                values["state"], values["reason"] = "failed", f"{ev.type}: {ev.reason or ''}"
    return values


def _cohort(members: Sequence[Any], percent: float) -> list[Any]:
    """The members a stage of ``percent`` covers: the first by cohort key of
    those that can still take part."""
    compatible = [m for m in members if m.state not in ("incompatible", "superseded")]
    return compatible[: stage_size(percent, len(compatible))]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- scheduling -------------------------------------------------------------------------

JOB_ID = "rollout-engine"
#: the alias of the SQLAlchemy job store (see controlplane.scheduler)
_ENGINES: dict[str, RolloutEngine] = {}


def run_tick(key: str) -> None:
    """The scheduled job: tick the engine registered under ``key``.

    The job store persists jobs by reference, so the job names this module
    function and a key rather than the engine object itself.
    """
    engine = _ENGINES.get(key)
    if engine is None:
        log.warning("rollout engine %s is not running in this process; tick skipped", key)
        return
    engine.tick()


def add_rollout_job(
    scheduler: BaseScheduler, engine: RolloutEngine, *, interval_s: float, jobstore: str,
    key: str,
) -> None:
    """Tick ``engine`` every ``interval_s`` seconds on ``scheduler``'s durable job store."""
    _ENGINES[key] = engine
    scheduler.add_job(
        run_tick,
        "interval",
        args=[key],
        seconds=interval_s,
        id=JOB_ID,
        jobstore=jobstore,
        replace_existing=True,
        next_run_time=datetime.now(UTC),
    )


def remove_rollout_engine(key: str) -> None:
    """Forget the engine registered under ``key`` (on shutdown)."""
    _ENGINES.pop(key, None)
