"""Reading the devices' ``evaluated`` events of a rollout, and the score table it shows.

The engine's ``min_eval_ratio`` gate (:mod:`.eval_gate`), ``GET
/v1/rollouts/{id}`` (``eval_scores``), ``slmfleet rollouts show`` and
``/metrics`` read the same figures: the latest ``evaluated`` event of each
member's assignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, select

from controlplane.db.models import DeviceEvent
from protocol import EvalOutcome, EvalScores, EventType

from .eval_gate import DeviceEval
from .queries import Member, chunks, members_of
from .store import rollouts


def _by_category(scores: EvalScores) -> dict[str, tuple[int, int]]:
    return {name: (c.passed, c.run) for name, c in scores.by_category.items()}


def device_eval(device_id: str, raw: Mapping[str, Any]) -> DeviceEval | None:
    """One event's ``eval`` column as the gate reads it (None if unreadable)."""
    try:
        outcome = EvalOutcome.model_validate(raw)
    except ValueError:
        return None
    old = outcome.active
    return DeviceEval(
        device_id, outcome.candidate.score, old.score if old is not None else None,
        _by_category(outcome.candidate), _by_category(old) if old is not None else {},
        outcome.candidate.stopped_early,
    )


def device_evals(conn: Connection, members: Sequence[Member]) -> dict[str, DeviceEval]:
    """Each member's latest ``evaluated`` event of its current assignment, by device."""
    device_of = {m.assignment_id: m.device_id for m in members if m.assignment_id}
    out: dict[str, DeviceEval] = {}
    for chunk in chunks(list(device_of)):
        rows = conn.execute(
            select(DeviceEvent.assignment_id, DeviceEvent.eval)
            .where(DeviceEvent.assignment_id.in_(chunk),
                   DeviceEvent.type == EventType.EVALUATED.value,
                   DeviceEvent.eval.is_not(None))
            .order_by(DeviceEvent.ts, DeviceEvent.id)
        ).all()
        for row in rows:
            report = device_eval(device_of[row.assignment_id], row.eval)
            if report is not None:
                out[report.device_id] = report
    return out


def score_table(members: Sequence[Member], evals: Mapping[str, DeviceEval],
                version: str) -> list[dict[str, Any]]:
    """Scores per tier and version: the new ``version`` and each old one, over the devices
    that reported them (``by_category``: passed and run summed over those devices)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(tier: str, ver: str, role: str, score: float,
            categories: Mapping[str, tuple[int, int]]) -> None:
        group = groups.setdefault((tier, role, ver), {
            "tier": tier, "version": ver, "role": role, "devices": 0, "sum": 0.0,
            "by_category": {}})
        group["devices"] += 1
        group["sum"] += score
        for name, (passed, run) in categories.items():
            done, count = group["by_category"].get(name, (0, 0))
            group["by_category"][name] = (done + passed, count + run)

    for member in members:
        report = evals.get(member.device_id)
        if report is None or not member.device_tier:
            continue
        add(member.device_tier, version, "new", report.new, report.new_by_category)
        if report.old is not None:
            old_version = (member.previous_ref or "").partition("@")[2] or "previous"
            add(member.device_tier, old_version, "old", report.old, report.old_by_category)
    return [
        {"tier": g["tier"], "version": g["version"], "role": g["role"], "devices": g["devices"],
         "score": round(g["sum"] / g["devices"], 4),
         "by_category": {name: {"passed": p, "run": r}
                         for name, (p, r) in sorted(g["by_category"].items())}}
        for _, g in sorted(groups.items())
    ]


def rollout_eval_scores(conn: Connection, rollout_id: str, version: str) -> list[dict[str, Any]]:
    """:func:`score_table` of a rollout's members (for its detail and the CLI)."""
    members = members_of(conn, rollout_id)
    return score_table(members, device_evals(conn, members), version)


#: rollouts whose scores /metrics exports: the newest, whatever their state
METRIC_ROLLOUTS = 10


def recent_eval_scores(conn: Connection, limit: int = METRIC_ROLLOUTS
                       ) -> list[tuple[str, str, dict[str, Any]]]:
    """(rollout id, model, score row) of the newest ``limit`` rollouts' score tables."""
    out = []
    for rollout_id, model, version in conn.execute(
        select(rollouts.c.id, rollouts.c.model_name, rollouts.c.version)
        .order_by(rollouts.c.created_at.desc()).limit(limit)
    ).all():
        out += [(rollout_id, model, row)
                for row in rollout_eval_scores(conn, rollout_id, version)]
    return out
