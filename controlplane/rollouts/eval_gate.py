"""The quality gate ``min_eval_ratio``: on-device evaluation scores, new over old.

Each device scores the release's evaluation set on the candidate during
its health check, and the version it ran before on the same set (once per
device, cached there), and reports both in one ``evaluated`` event. The
gate pairs the two scores per device, so a device's speed, threads and
quantization-specific luck weigh on both sides alike, and judges per tier::

    ratio = sum(new scores) / sum(old scores)      over the stage's device pairs

The tier fails when ``ratio < min_eval_ratio``. A tier with no pair yet
waits while a device of it is still updating; with none left updating it
passes and says why (the release has no evaluation set, the devices ran no
version before, or their agents do not score). Pure functions: the engine
reads the events (:mod:`.eval_scores`), this module judges them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.db.statuses import MemberState

from .gates import GateResult, MemberView

GATE = "min_eval_ratio"


@dataclass(frozen=True)
class DeviceEval:
    """One device's ``evaluated`` event: its candidate's and its old version's scores."""

    device_id: str
    new: float
    old: float | None
    #: per category, (passed, run) of each side
    new_by_category: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    old_by_category: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    stopped_early: bool = False


@dataclass(frozen=True)
class TierScores:
    """A tier's paired scores: the mean of each side over the devices that have both."""

    tier: str
    devices: int
    new: float
    old: float

    @property
    def ratio(self) -> float | None:
        """New over old (None when the old version scored nothing)."""
        return self.new / self.old if self.old > 0 else None


def tier_scores(members: Sequence[MemberView],
                evals: Mapping[str, DeviceEval]) -> dict[str, TierScores]:
    """Each tier's paired scores over ``members`` that reported both sides."""
    sums: dict[str, tuple[int, float, float]] = {}
    for member in members:
        report = evals.get(member.device_id)
        if report is None or report.old is None or not member.tier:
            continue
        n, new, old = sums.get(member.tier, (0, 0.0, 0.0))
        sums[member.tier] = (n + 1, new + report.new, old + report.old)
    return {tier: TierScores(tier, n, new / n, old / n) for tier, (n, new, old) in sums.items()}


def eval_gates(threshold: float, members: Sequence[MemberView],
               evals: Mapping[str, DeviceEval]) -> list[GateResult]:
    """The ``min_eval_ratio`` verdict of every tier among ``members``."""
    scores = tier_scores(members, evals)
    out = []
    for tier in sorted({m.tier for m in members if m.tier}):
        paired = scores.get(tier)
        if paired is None:
            updating = any(m.tier == tier and m.state == MemberState.ASSIGNED for m in members)
            if updating:
                out.append(GateResult(GATE, "wait", None, threshold, tier,
                                      "waiting for the devices' evaluation scores"))
            else:
                out.append(GateResult(GATE, "pass", None, threshold, tier,
                                      "no device reported scores of both versions"))
            continue
        figures = (f"new {paired.new:.3f} vs old {paired.old:.3f} "
                   f"on {paired.devices} device(s)")
        ratio = paired.ratio
        if ratio is None:
            out.append(GateResult(GATE, "pass", None, threshold, tier,
                                  f"{figures}; the old version scored 0"))
            continue
        out.append(GateResult(GATE, "fail" if ratio < threshold else "pass", ratio,
                              threshold, tier, figures))
    return out
