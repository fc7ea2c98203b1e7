"""Rollout rows: creating one, changing its state safely, recording decisions.

Every state change is ``UPDATE rollouts ... WHERE id = ? AND revision = ?``
with the revision bumped: whoever changes a rollout first wins, and the
other writer (an engine tick racing an operator, or another replica) sees
:class:`RolloutConflict` or simply re-reads next tick -- a stage can never
be advanced twice from the same view. The decision that explains a change
is written in the same transaction as the change.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, func, insert, select, update
from sqlalchemy.orm import Session

from controlplane.db.models import ModelVersion, Rollout, RolloutDecision, RolloutDevice
from controlplane.db.statuses import LIVE_ROLLOUT_STATES, MemberState, RolloutState

from .spec import RolloutSpec

rollouts: Table = Rollout.__table__  # type: ignore[assignment]
decisions: Table = RolloutDecision.__table__  # type: ignore[assignment]
members: Table = RolloutDevice.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class RolloutRow:
    """A rollout as read at one instant; changes to it are conditional on ``revision``."""

    id: str
    model_name: str
    version: str
    spec: dict[str, Any]
    state: RolloutState
    stage_index: int
    stage_started_at: float | None
    approved_stage: int
    revision: int
    created_at: float
    reason: str | None
    last_gates: list[Any] | None
    #: when the current stage had enough activated devices for its bake to start
    bake_started_at: float | None = None

    @classmethod
    def of(cls, row: Row[Any]) -> RolloutRow:
        """The value of a row read from the ``rollouts`` table."""
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


class RolloutError(Exception):
    """Base of the refusals the API turns into 4xx answers."""


class UnknownRollout(RolloutError, LookupError):
    """No rollout has this id."""


class RolloutConflict(RolloutError):
    """The action does not apply to the rollout in its current state."""


class UnknownVersion(RolloutError, LookupError):
    """The spec names a release that is not registered."""


def new_rollout_id() -> str:
    """``r-`` and 16 hex digits."""
    return f"r-{secrets.token_hex(8)}"


def record(
    conn: Connection,
    rollout_id: str,
    kind: str,
    reason: str,
    *,
    stage_index: int | None,
    actor: str = "engine",
    details: dict[str, Any] | None = None,
    now: float | None = None,
) -> None:
    """Append one decision to the rollout's timeline (inside ``conn``'s transaction)."""
    conn.execute(
        insert(decisions),
        {
            "rollout_id": rollout_id,
            "ts": time.time() if now is None else now,
            "kind": kind,
            "stage_index": stage_index,
            "actor": actor,
            "reason": reason[:2048],
            "details": details,
        },
    )


def transition(
    conn: Connection,
    row: RolloutRow,
    values: dict[str, Any],
    *,
    kind: str,
    reason: str,
    actor: str = "engine",
    details: dict[str, Any] | None = None,
    now: float | None = None,
) -> bool:
    """Apply ``values`` to the rollout if nobody changed it since ``row`` was read.

    Records the decision in the same transaction. Returns False (and changes
    nothing) when the rollout moved on meanwhile.
    """
    now = time.time() if now is None else now
    if values.get("reason"):
        values = {**values, "reason": values["reason"][:1024]}
    changed = conn.execute(
        update(rollouts)
        .where(rollouts.c.id == row.id, rollouts.c.revision == row.revision)
        .values(**values, revision=row.revision + 1, updated_at=now)
    ).rowcount
    if changed != 1:
        return False
    stage = values.get("stage_index", row.stage_index)
    record(conn, row.id, kind, reason, stage_index=stage, actor=actor, details=details, now=now)
    return True


def create(engine: Engine, spec: RolloutSpec, *, now: float | None = None) -> str:
    """Store a new rollout of a registered release; return its id.

    Older live rollouts of the same model with the same target are
    superseded in the same transaction: one rollout per model drives a
    device at a time. Overlapping targets are resolved per device when the
    new rollout takes each device over.
    """
    now = time.time() if now is None else now
    rollout_id = new_rollout_id()
    first = spec.stages[0]
    with engine.begin() as conn:
        version_id = conn.execute(
            select(ModelVersion.id).where(
                ModelVersion.model_name == spec.model, ModelVersion.version == spec.version
            )
        ).scalar_one_or_none()
        if version_id is None:
            raise UnknownVersion(
                f"{spec.model}@{spec.version} is not registered; publish it first "
                "(`slmfleet models publish`)"
            )
        older = conn.execute(
            select(rollouts).where(rollouts.c.model_name == spec.model,
                                   rollouts.c.state.in_(LIVE_ROLLOUT_STATES))
        ).all()
        target = spec.target.model_dump(mode="json")
        for row in map(RolloutRow.of, older):
            if row.spec.get("target") == target:
                transition(conn, row, {"state": RolloutState.SUPERSEDED,
                                       "reason": f"superseded by rollout {rollout_id}"},
                           kind="superseded", reason=f"superseded by rollout {rollout_id} "
                           f"({spec.model}@{spec.version}, same target)", now=now)
        state = RolloutState.AWAITING_APPROVAL if first.approval else RolloutState.ACTIVE
        conn.execute(
            insert(rollouts),
            {
                "id": rollout_id,
                "model_name": spec.model,
                "version": spec.version,
                "version_id": version_id,
                "spec": spec.model_dump(mode="json"),
                "state": state,
                "stage_index": 0,
                "stage_started_at": None if first.approval else now,
                "approved_stage": -1,
                "revision": 0,
                "created_at": now,
                "updated_at": now,
                "reason": "waiting for approval of stage 1" if first.approval else None,
                "last_gates": None,
            },
        )
        record(conn, rollout_id, "created",
               f"rollout of {spec.model}@{spec.version} in {len(spec.stages)} stage(s) "
               f"({', '.join(f'{s.percent:g} %' for s in spec.stages)}), "
               f"on failure: {spec.on_failure}",
               stage_index=0, actor="operator", now=now)
        if first.approval:
            record(conn, rollout_id, "awaiting_approval", "stage 1 needs an operator's approval",
                   stage_index=0, now=now)
    return rollout_id


# -- operator actions ---------------------------------------------------------------


def load(conn: Connection, rollout_id: str) -> RolloutRow:
    """The rollout as it is now, or :class:`UnknownRollout`."""
    row = conn.execute(select(rollouts).where(rollouts.c.id == rollout_id)).one_or_none()
    if row is None:
        raise UnknownRollout(f"rollout {rollout_id!r} not found")
    return RolloutRow.of(row)


_S = RolloutState
#: states an operator may stop or roll back a rollout from
_STOPPABLE = (_S.ACTIVE, _S.PAUSED, _S.AWAITING_APPROVAL, _S.COMPLETED)
#: action -> (states it applies to, new state, decision kind)
_ACTIONS: dict[str, tuple[tuple[RolloutState, ...], RolloutState, str]] = {
    "pause": ((_S.ACTIVE, _S.AWAITING_APPROVAL), _S.PAUSED, "paused"),
    "resume": ((_S.PAUSED,), _S.ACTIVE, "resumed"),
    "approve": ((_S.AWAITING_APPROVAL,), _S.ACTIVE, "approved"),
    "abort": (_STOPPABLE, _S.ABORTED, "aborted"),
    "rollback": (_STOPPABLE, _S.ROLLING_BACK, "rollback_requested"),
}
ACTIONS = tuple(_ACTIONS)


def act(engine: Engine, rollout_id: str, action: str, *, reason: str | None = None,
        now: float | None = None) -> None:
    """Apply an operator action; :class:`RolloutConflict` when it does not apply now.

    ``resume`` restarts the current stage's bake time: the gates judge the
    stage afresh, and a stage that still fails them pauses or rolls back
    again. ``abort`` stops sending anything new and leaves devices on what
    they run; ``rollback`` sends every device the rollout touched back to the
    version it ran before (done by the engine on its next tick).
    """
    if action not in _ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    allowed, new_state, kind = _ACTIONS[action]
    now = time.time() if now is None else now
    with engine.begin() as conn:
        row = load(conn, rollout_id)
        if row.state not in allowed:
            raise RolloutConflict(
                f"cannot {action} rollout {rollout_id}: it is {row.state} "
                f"({action} applies to: {', '.join(allowed)})"
            )
        values: dict[str, Any] = {"state": new_state}
        why = reason or f"{action} by an operator"
        values["reason"] = why
        if action == "resume" and row.stage_started_at is None:
            # Paused while it waited for approval: it goes back to waiting.
            values["state"] = RolloutState.AWAITING_APPROVAL
        elif action in ("resume", "approve"):
            values["stage_started_at"] = now
        if action == "approve":
            values["approved_stage"] = row.stage_index
        if not transition(conn, row, values, kind=kind, reason=why, actor="operator", now=now):
            raise RolloutConflict(f"rollout {rollout_id} changed meanwhile; try again")


# -- reads --------------------------------------------------------------------------


def list_rollouts(
    session: Session, *, after: str | None, limit: int, state: str | None = None
) -> Sequence[Rollout]:
    """Up to ``limit`` rollouts, newest first (keyset on ``(created_at, id)``)."""
    query = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id.desc()).limit(limit)
    if state is not None:
        try:
            wanted = RolloutState(state)
        except ValueError:
            return []  # no rollout is in a state that does not exist
        query = query.where(Rollout.state == wanted)
    if after is not None:
        ts, _, rid = after.partition(" ")
        created = float(ts)
        query = query.where(
            (Rollout.created_at < created) | ((Rollout.created_at == created) & (Rollout.id < rid))
        )
    return session.scalars(query).all()


def get(session: Session, rollout_id: str) -> Rollout:
    """The rollout, or :class:`UnknownRollout`."""
    row = session.get(Rollout, rollout_id)
    if row is None:
        raise UnknownRollout(f"rollout {rollout_id!r} not found")
    return row


def member_counts(
    session: Session, rollout_id: str
) -> list[tuple[int | None, str | None, MemberState, int]]:
    """``(stage_index, device tier, state, count)`` of the rollout's devices."""
    rows = session.execute(
        select(RolloutDevice.stage_index, RolloutDevice.device_tier, RolloutDevice.state,
               func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.stage_index, RolloutDevice.device_tier, RolloutDevice.state)
    ).all()
    return [(s, t, st, int(n)) for s, t, st, n in rows]


def members_of(session: Session, rollout_id: str, limit: int) -> Sequence[RolloutDevice]:
    """Up to ``limit`` of the rollout's devices, by device id."""
    return session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
        .order_by(RolloutDevice.device_id).limit(limit)
    ).all()


def timeline(session: Session, rollout_id: str, limit: int) -> Sequence[RolloutDecision]:
    """The rollout's newest ``limit`` decisions, oldest first."""
    rows = session.scalars(
        select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id)
        .order_by(RolloutDecision.id.desc()).limit(limit)
    ).all()
    return list(reversed(rows))
