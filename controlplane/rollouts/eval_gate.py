"""The quality gate ``min_eval_ratio``: on-device evaluation scores, new over old.

Each device scores the release's evaluation set on the candidate during
its health check, and the version it ran before on the same set (once per
device, cached there), and reports both in one ``evaluated`` event. The
gate pairs the two scores per device, so a device's speed, threads and
quantization-specific luck weigh on both sides alike, and judges per tier::

    ratio = sum(new scores) / sum(old scores)      over the stage's device pairs

A side's score here is the share of the items it *ran* that passed: a
check that ran out of its time budget counts the items it never reached
as failed in its reported score, and two such truncated scores (the old
version's from an earlier, quieter check, the new one's on a busy device)
would otherwise compare how far each got, not how well each answered.

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

    @property
    def new_rate(self) -> float:
        """The candidate's passed share of the items it ran."""
        return _rate(self.new, self.new_by_category)

    @property
    def old_rate(self) -> float | None:
        """The old version's passed share of the items it ran (None: not scored)."""
        return None if self.old is None else _rate(self.old, self.old_by_category)

    @property
    def truncated(self) -> bool:
        """Whether either side left items unrun (its budget ran out)."""
        if self.stopped_early:
            return True
        return bool(self.old_by_category) and (
            _ran(self.new_by_category) != _ran(self.old_by_category))


def _ran(by_category: Mapping[str, tuple[int, int]]) -> int:
    return sum(run for _, run in by_category.values())


def _rate(score: float, by_category: Mapping[str, tuple[int, int]]) -> float:
    """Passed over run from the per-category counts; the reported score without them."""
    run = _ran(by_category)
    if not by_category or run == 0:
        return score
    return sum(passed for passed, _ in by_category.values()) / run


@dataclass(frozen=True)
class TierScores:
    """A tier's paired scores: the mean of each side over the devices that have both."""

    tier: str
    devices: int
    new: float
    old: float
    #: whether some device's check (either side) ran out of its budget
    truncated: bool = False

    @property
    def ratio(self) -> float | None:
        """New over old (None when the old version scored nothing)."""
        return self.new / self.old if self.old > 0 else None


def tier_scores(members: Sequence[MemberView],
                evals: Mapping[str, DeviceEval]) -> dict[str, TierScores]:
    """Each tier's paired scores over ``members`` that reported both sides."""
    sums: dict[str, tuple[int, float, float, bool]] = {}
    for member in members:
        report = evals.get(member.device_id)
        old_rate = report.old_rate if report is not None else None
        if report is None or old_rate is None or not member.tier:
            continue
        n, new, old, cut = sums.get(member.tier, (0, 0.0, 0.0, False))
        sums[member.tier] = (n + 1, new + report.new_rate, old + old_rate,
                             cut or report.truncated)
    return {tier: TierScores(tier, n, new / n, old / n, cut)
            for tier, (n, new, old, cut) in sums.items()}


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
        if paired.truncated:
            figures += " (passed share of the items each ran within its time budget)"
        ratio = paired.ratio
        if ratio is None:
            out.append(GateResult(GATE, "pass", None, threshold, tier,
                                  f"{figures}; the old version scored 0"))
            continue
        out.append(GateResult(GATE, "fail" if ratio < threshold else "pass", ratio,
                              threshold, tier, figures))
    return out
