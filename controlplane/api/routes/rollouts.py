"""``/v1/rollouts``: staged canary rollouts, and the operator's levers on them.

``POST /v1/rollouts`` stores a rollout; the engine (controlplane.rollouts)
does the rest on its ticks. The actions (pause, resume, approve, abort,
rollback) change the rollout's state and are recorded in its timeline with
the operator's reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from controlplane.api.deps import ContextDep, SessionDep, described, not_configured, off_response
from controlplane.api.pagination import PageDep
from controlplane.api.schemas_rollouts import (
    ActionRequest,
    DecisionOut,
    MemberOut,
    RolloutDetail,
    RolloutPage,
    RolloutSummary,
    StageOut,
)
from controlplane.db.models import Rollout
from controlplane.rollouts import ACTIONS, RolloutSpec, store

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

#: devices and decisions shown in one rollout's detail
DETAIL_DEVICES = 1000
DETAIL_DECISIONS = 500
_ACTION_PATTERN = "^(" + "|".join(ACTIONS) + ")$"

DIRECTOR_OFF = (
    "rollouts are off: set director_keys_file and director_key_files (see docs/models.md)"
)


def _summary(row: Rollout) -> RolloutSummary:
    stages = row.spec["stages"]
    return RolloutSummary(
        id=row.id, model=row.model_name, version=row.version, state=row.state,
        stage=row.stage_index + 1, stages=len(stages),
        percent=stages[row.stage_index]["percent"], created_at=row.created_at,
        updated_at=row.updated_at, reason=row.reason,
    )


def _detail(session: SessionDep, row: Rollout) -> RolloutDetail:
    counts: Counter[str] = Counter()
    per_stage: dict[int, Counter[str]] = {}
    per_tier: dict[str, Counter[str]] = {}
    for stage, tier, state, n in store.member_counts(session, row.id):
        counts[state] += n
        if stage is not None:
            per_stage.setdefault(stage, Counter())[state] += n
        per_tier.setdefault(tier or "unknown", Counter())[state] += n
    stages = []
    for i, stage in enumerate(row.spec["stages"]):
        if i < row.stage_index or (i == row.stage_index and row.state == "completed"):
            status = "done"
        elif i == row.stage_index:
            status = "current"
        else:
            status = "waiting"
        stages.append(StageOut(index=i + 1, percent=stage["percent"], bake_s=stage["bake_s"],
                               approval=stage["approval"], status=status,
                               devices=dict(per_stage.get(i, {}))))
    members = store.members_of(session, row.id, DETAIL_DEVICES + 1)
    return RolloutDetail(
        **_summary(row).model_dump(),
        spec=row.spec,
        stage_started_at=row.stage_started_at,
        bake_started_at=row.bake_started_at,
        counts=dict(counts),
        per_stage=stages,
        per_tier={tier: dict(c) for tier, c in sorted(per_tier.items())},
        gates=row.last_gates or [],
        timeline=[
            DecisionOut(ts=d.ts, kind=d.kind,
                        stage=None if d.stage_index is None else d.stage_index + 1,
                        actor=d.actor, reason=d.reason, details=d.details)
            for d in store.timeline(session, row.id, DETAIL_DECISIONS)
        ],
        devices=[
            MemberOut(device_id=m.device_id, device_tier=m.device_tier,
                      variant_tier=m.variant_tier, state=m.state,
                      stage=None if m.stage_index is None else m.stage_index + 1,
                      assignment_id=m.assignment_id, previous=m.previous_ref,
                      health=m.health, reason=m.reason)
            for m in members[:DETAIL_DEVICES]
        ],
        devices_truncated=len(members) > DETAIL_DEVICES,
    )


@router.post(
    "",
    response_model=RolloutDetail,
    status_code=201,
    responses={
        **off_response("the director key", also="the release is not registered"),
        **described({422: "bad spec"}),
    },
)
def create_rollout(spec: RolloutSpec, context: ContextDep, session: SessionDep) -> RolloutDetail:
    """Start a staged rollout of a registered release; the engine takes it from here."""
    if context.director is None:
        raise not_configured(DIRECTOR_OFF)
    try:
        rollout_id = store.create(context.engine, spec)
    except store.UnknownVersion as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    context.kick_rollouts()
    return _detail(session, store.get(session, rollout_id))


@router.get("", response_model=RolloutPage)
def list_rollouts(
    session: SessionDep,
    page: PageDep,
    state: Annotated[str | None, Query(max_length=24, description="only this state")] = None,
) -> RolloutPage:
    """Rollouts, newest first."""
    rows = store.list_rollouts(
        session, after=page.after(_checked_key), limit=page.fetch, state=state
    )
    served, after = page.cut(rows, lambda r: f"{r.created_at!r} {r.id}")
    return RolloutPage(items=[_summary(r) for r in served], next=after)


def _checked_key(raw: str) -> str:
    # The store parses "<created_at> <id>" itself; refuse here what it could not parse.
    ts, _, rollout_id = raw.partition(" ")
    float(ts)
    if not rollout_id:
        raise ValueError(f"not a rollout key: {raw!r}")
    return raw


@router.get("/{rollout_id}", response_model=RolloutDetail,
            responses=described({404: "no such rollout"}))
def get_rollout(rollout_id: str, session: SessionDep) -> RolloutDetail:
    """Stage, counts per stage and tier, the latest gate evaluation, timeline and devices."""
    try:
        return _detail(session, store.get(session, rollout_id))
    except store.UnknownRollout as exc:
        raise HTTPException(404, detail=str(exc)) from exc


@router.post(
    "/{rollout_id}/{action}",
    response_model=RolloutDetail,
    responses=described({
        404: "no such rollout", 409: "the action does not apply in the rollout's state"
    }),
)
def act(
    rollout_id: str,
    action: Annotated[str, Path(pattern=_ACTION_PATTERN,
                                description="pause, resume, approve, abort or rollback")],
    context: ContextDep,
    session: SessionDep,
    body: ActionRequest | None = None,
) -> RolloutDetail:
    """Pause, resume, approve the next stage, abort, or roll back (see docs/rollouts.md)."""
    try:
        store.act(context.engine, rollout_id, action, reason=body.reason if body else None)
    except store.UnknownRollout as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    except store.RolloutConflict as exc:
        raise HTTPException(409, detail=str(exc)) from exc
    context.kick_rollouts()
    session.expire_all()
    return _detail(session, store.get(session, rollout_id))

