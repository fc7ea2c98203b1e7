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
   ``rejected``; ``health_passed`` / ``health_failed``). An event whose
   code says the device cannot run the variant (a fit-check rejection)
   makes it ``incompatible``, not failed (:mod:`.outcome`). An assignment this
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
   an operator's approval when the next stage asks for one. The bake counts
   from the moment the stage had enough activated devices (``bake_started``),
   not from the assignment: devices waiting on the device for a window, a
   lock or an unmetered link (``waiting``) are neither failed nor stuck, and
   hold nothing up but the activations the bake waits for (:mod:`.waiting`).

Rollback sends each device the rollout touched a new document (through the
director) whose entry for the rollout's model is the version it ran when it
joined, or none; the device's other models keep their entries. Everything
is read from and written to the database, so a restarted control plane
resumes exactly where the last committed tick left it: stage advances are
conditional on the rollout's revision, and a device is assigned only from
``pending``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from controlplane.db import telemetry_aggregates
from controlplane.db.statuses import OUT_OF_ROLLOUT, MemberState, RolloutState
from controlplane.db.telemetry_aggregates import Aggregate
from controlplane.director import Director, UnknownRelease
from controlplane.tier_policy import choose_tier
from controlplane.update_policies import layer_of
from protocol import ProtocolError, ReleaseManifest, Tier

from . import queries, store
from .cohort import cohort_key, stage_size
from .eval_scores import device_evals
from .gates import GateResult, evaluate, overall
from .outcome import changed_outcomes
from .queries import Issued, Member
from .spec import RolloutSpec
from .store import RolloutRow
from .waiting import bake_may_start, holds_download_slot

log = logging.getLogger(__name__)

#: devices joined per rollout per tick; the rest join on the next ticks
JOIN_BATCH = 20_000


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
                ids = queries.live_rollout_ids(conn)
            for rollout_id in ids:
                try:
                    self._step(rollout_id)
                except Exception:
                    # One broken rollout must not stall the others; it is
                    # retried next tick from what was committed.
                    log.exception("rollout %s: tick failed", rollout_id)
            self.ticks += 1

    def _load(self, rollout_id: str) -> RolloutRow:
        with self._engine.connect() as conn:
            return store.load(conn, rollout_id)

    def _members(self, rollout_id: str) -> list[Member]:
        with self._engine.connect() as conn:
            return queries.members_of(conn, rollout_id)

    def _step(self, rollout_id: str) -> None:
        row = self._load(rollout_id)
        spec = RolloutSpec.model_validate(row.spec)
        if row.state == RolloutState.ROLLING_BACK:
            self._rollback(row, spec)
            return
        try:
            manifest = self._director.verified_release(spec.model, spec.version)
        except (UnknownRelease, ProtocolError) as exc:
            if row.state == RolloutState.ACTIVE:
                self._fail(row, f"the release cannot be assigned any more: {exc}", [], spec,
                           action="pause")
            return
        self._join(row, spec, manifest)
        self._observe(row)
        if row.state in (RolloutState.PAUSED, RolloutState.AWAITING_APPROVAL):
            return  # a paused rollout sends nothing new
        members = self._members(row.id)
        assigned = [m for m in members if m.stage_index is not None
                    and m.state not in OUT_OF_ROLLOUT]
        if row.state == RolloutState.ACTIVE:
            results = self._judge(row, spec, assigned)
            if overall(results) == "fail":
                failed = [r for r in results if r.verdict == "fail"]
                why = "; ".join(r.describe() for r in failed)
                # The devices' own words say what went wrong on them.
                said = [f"{m.device_id}: {m.reason}" for m in assigned
                        if m.state == MemberState.FAILED and m.reason][:3]
                if said:
                    why += " — " + "; ".join(said)
                self._fail(row, why, results, spec, action=spec.on_failure)
                return
        else:
            results = []
        self._assign(row, spec, members)
        if row.state == RolloutState.ACTIVE:
            self._maybe_advance(row, spec, results)

    # -- 1. join -------------------------------------------------------------------

    def _join(self, row: RolloutRow, spec: RolloutSpec, manifest: ReleaseManifest) -> None:
        now = self._clock()
        with self._engine.begin() as conn:
            known = queries.member_ids(conn, row.id)
            # Ids first: every tick asks, and only newcomers need their reports read.
            new_ids = [d for d in queries.matching_device_ids(conn, spec.target)
                       if d not in known][:JOIN_BATCH]
            if not new_ids:
                return
            rows = []
            for device in queries.candidates(conn, new_ids):
                tier, why = choose_tier(manifest, Tier(device.tier), device.ram_bytes)
                # This model's version only: the device's other models are not
                # this rollout's to touch, on the way in or back.
                previous = device.running(spec.model)
                rows.append({
                    "rollout_id": row.id,
                    "device_id": device.id,
                    "device_tier": device.tier,
                    "variant_tier": tier.value if tier else None,
                    "cohort_key": cohort_key(row.id, device.id),
                    "state": MemberState.PENDING if tier else MemberState.INCOMPATIBLE,
                    "stage_index": None,
                    "assignment_id": None,
                    "assigned_at": None,
                    "previous_ref": previous,
                    "health": None,
                    "reason": None if tier else why,
                    "updated_at": now,
                })
            queries.add_members(conn, rows)
            queries.take_over(conn, row, [r["device_id"] for r in rows
                                          if r["state"] == MemberState.PENDING], now)
            incompatible = sum(r["state"] == MemberState.INCOMPATIBLE for r in rows)
            store.record(
                conn, row.id, "devices_joined",
                f"{len(rows)} device(s) matched the target"
                + (f", {incompatible} of them incompatible" if incompatible else ""),
                stage_index=row.stage_index,
                details={"devices": len(rows), "incompatible": incompatible},
                now=now,
            )

    # -- 2. observe ----------------------------------------------------------------

    def _observe(self, row: RolloutRow) -> None:
        now = self._clock()
        members = self._members(row.id)
        pending = [m.device_id for m in members if m.state == MemberState.PENDING]
        watching = {m.assignment_id: m for m in members if m.assignment_id
                    and m.state in (MemberState.ASSIGNED, MemberState.WAITING)}
        with self._engine.begin() as conn:
            # Adopt assignments this rollout issued but never recorded (a crash
            # between the director's commit and ours); none issued, none to adopt.
            if pending and queries.issued_any(conn, row.id):
                queries.mark_assigned(conn, row.id, queries.issued_to(conn, row.id, pending),
                                      row.stage_index, now)
            queries.set_outcomes(conn, row.id, changed_outcomes(
                watching, queries.events_for(conn, list(watching))), now)

    # -- 3. judge --------------------------------------------------------------------

    def _judge(self, row: RolloutRow, spec: RolloutSpec,
               assigned: Sequence[Member]) -> list[GateResult]:
        gates = spec.gates_for(row.stage_index)
        new_by_tier: dict[str, Aggregate] = {}
        old_by_tier: dict[str, Aggregate] = {}
        needs_metrics = any(v is not None for v in (
            gates.max_p95_latency_ratio, gates.min_tokens_per_s_ratio, gates.max_error_rate,
            gates.max_crashes))
        if needs_metrics and assigned:
            new_by_tier, old_by_tier = self._metrics(row, spec, assigned)
        evals = None
        if gates.min_eval_ratio is not None:
            with self._engine.connect() as conn:
                evals = device_evals(conn, assigned)
        results = evaluate(gates, [m.view() for m in assigned], new_by_tier, old_by_tier, evals)
        public = [r.public() for r in results]
        if public != row.last_gates:
            with self._engine.begin() as conn:
                queries.save_gates(conn, row.id, public)
        return results

    def _metrics(
        self, row: RolloutRow, spec: RolloutSpec, assigned: Sequence[Member]
    ) -> tuple[dict[str, Aggregate], dict[str, Aggregate]]:
        since = row.created_at
        mine = [m.device_id for m in assigned if m.state == MemberState.SUCCEEDED]
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

    def _fail(self, row: RolloutRow, why: str, results: Sequence[GateResult],
              spec: RolloutSpec, *, action: str) -> None:
        details = {"gates": [r.public() for r in results], "action": action}
        stage = row.stage_index + 1
        new_state = RolloutState.ROLLING_BACK if action == "rollback" else RolloutState.PAUSED
        with self._engine.begin() as conn:
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

    def _online(self, members: Sequence[Member]) -> set[str]:
        """Which of ``members``' devices are online now."""
        with self._engine.connect() as conn:
            return queries.online_ids(conn, [m.device_id for m in members])

    def _assign(self, row: RolloutRow, spec: RolloutSpec, members: Sequence[Member]) -> None:
        percent = (100.0 if row.state == RolloutState.COMPLETED
                   else spec.stages[row.stage_index].percent)
        pending = [m for m in _cohort(members, percent) if m.state == MemberState.PENDING]
        if not pending:
            return
        online = self._online(pending)
        todo = [m for m in pending if m.device_id in online]
        if spec.max_concurrent_downloads is not None:
            busy = sum(holds_download_slot(m) for m in members)
            todo = todo[: max(0, spec.max_concurrent_downloads - busy)]
        if not todo:
            return
        # An operator may have paused since this tick read the rollout.
        if self._load(row.id).revision != row.revision:
            return
        own = layer_of(spec)
        results = self._director.assign(
            [m.device_id for m in todo], spec.model, spec.version, rollout_id=row.id,
            policy=None if own.is_empty() else own,
        )
        now = self._clock()
        sent = [r for r in results if r.status == "assigned"]
        issued = [Issued(r.device_id, r.assignment_id, now) for r in sent if r.assignment_id]
        with self._engine.begin() as conn:
            # One executemany per outcome, not one statement per device: a
            # stage of thousands of devices is recorded in one round trip each.
            queries.mark_assigned(conn, row.id, issued, row.stage_index, now)
            # unknown_device (deleted meanwhile) is left out: the row goes with it.
            # A device whose agent reads one model and runs another cannot take
            # this one before its agent is upgraded: out of the stages, with the reason.
            queries.mark_incompatible(conn, row.id, {
                r.device_id: r.reason for r in results
                if r.status in ("incompatible", "needs_upgrade")}, now)
            if sent:
                store.record(
                    conn, row.id, "assigned",
                    f"assigned {spec.model}@{spec.version} to {len(sent)} device(s) of stage "
                    f"{row.stage_index + 1} ({percent:g} %)",
                    stage_index=row.stage_index,
                    details={"devices": [r.device_id for r in sent][:100]},
                    now=now,
                )

    # -- 5. advance ----------------------------------------------------------------

    def _maybe_advance(self, row: RolloutRow, spec: RolloutSpec,
                       results: Sequence[GateResult]) -> None:
        members = self._members(row.id)
        stage = spec.stages[row.stage_index]
        cohort = _cohort(members, stage.percent)
        if not cohort:
            return
        online = self._online(cohort)
        waiting = [m for m in cohort if m.state == MemberState.PENDING and m.device_id in online]
        updating = [m for m in cohort if m.state == MemberState.ASSIGNED]
        now = self._clock()
        if row.bake_started_at is None:
            if not waiting and row.stage_started_at is not None \
                    and bake_may_start(cohort, spec.gates_for(row.stage_index)):
                self._start_bake(row, cohort, stage.bake_s, now)
            return
        baked = now - row.bake_started_at >= stage.bake_s
        if waiting or updating or not baked or overall(results) != "pass":
            return
        assert row.stage_started_at is not None  # baked
        gates = [r.public() for r in results]
        last = row.stage_index == len(spec.stages) - 1
        with self._engine.begin() as conn:
            if last:
                store.transition(
                    conn, row, {"state": RolloutState.COMPLETED,
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
                "state": RolloutState.AWAITING_APPROVAL if needs_approval
                else RolloutState.ACTIVE,
                "reason": f"waiting for approval of stage {nxt + 1}" if needs_approval else None,
                "last_gates": None,
                "bake_started_at": None,
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

    def _start_bake(self, row: RolloutRow, cohort: Sequence[Member], bake_s: float,
                    now: float) -> None:
        activated, waiting = (sum(m.state == state for m in cohort)
                              for state in (MemberState.SUCCEEDED, MemberState.WAITING))
        with self._engine.begin() as conn:
            store.transition(
                conn, row, {"bake_started_at": now}, kind="bake_started",
                reason=f"stage {row.stage_index + 1}: {activated} of {len(cohort)} device(s) "
                       f"activated; its {bake_s:g} s bake starts now"
                       + (f" ({waiting} still waiting on the device)" if waiting else ""),
                details={"activated": activated, "waiting": waiting}, now=now,
            )

    # -- rollback ------------------------------------------------------------------

    def _rollback(self, row: RolloutRow, spec: RolloutSpec) -> None:
        """Send every device this rollout assigned back to what it ran before; then finish."""
        touched = (MemberState.ASSIGNED, MemberState.WAITING, MemberState.SUCCEEDED,
                   MemberState.FAILED)
        members = [m for m in self._members(row.id) if m.state in touched]
        by_previous: dict[str | None, list[str]] = {}
        for m in members:
            by_previous.setdefault(m.previous_ref, []).append(m.device_id)
        notes = []
        for previous, device_ids in sorted(by_previous.items(), key=lambda kv: str(kv[0])):
            outcome = self._send_back(previous, device_ids, row.id, spec.model)
            notes.append(outcome)
            with self._engine.begin() as conn:
                queries.mark_rolled_back(conn, row.id, device_ids, outcome, self._clock())
        with self._engine.begin() as conn:
            store.transition(
                conn, row, {"state": RolloutState.ROLLED_BACK, "reason": row.reason},
                kind="rolled_back",
                reason=(f"{len(members)} device(s) sent back: " + "; ".join(notes))
                if members else "no device had been assigned; nothing to send back",
                details={"devices": len(members)}, now=self._clock(),
            )
        log.warning("rollout %s rolled back (%d device(s))", row.id, len(members))

    def _send_back(self, previous: str | None, device_ids: list[str], rollout_id: str,
                   model: str) -> str:
        # Only this model's entry moves; the devices' other models keep theirs.
        if previous is None:
            self._director.remove(device_ids, model)
            return f"{len(device_ids)} without a previous version: {model} taken off"
        name, _, version = previous.partition("@")
        try:
            results = self._director.assign(device_ids, name, version, rollout_id=rollout_id)
        except (UnknownRelease, ProtocolError) as exc:
            # The old release is gone or no longer verifies: the best left is
            # to stop pushing the new one.
            self._director.remove(device_ids, model)
            return f"{len(device_ids)} to {previous} impossible ({exc}): {model} taken off"
        sent = sum(r.status == "assigned" for r in results)
        return f"{sent} of {len(device_ids)} reassigned {previous}"


def _cohort(members: Sequence[Member], percent: float) -> list[Member]:
    """The members a stage of ``percent`` covers: the first by cohort key of
    those that can still take part."""
    compatible = [m for m in members if m.state not in OUT_OF_ROLLOUT]
    return compatible[: stage_size(percent, len(compatible))]


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
