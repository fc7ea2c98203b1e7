"""Gate evaluation: pure functions from what was measured to pass / fail / wait.

No database, no clock: the engine gathers the figures
(:mod:`controlplane.db.telemetry_aggregates` and the rollout's device states) and this
module judges them, so every verdict can be tested from plain values and is
stored with the values and thresholds it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from controlplane.db.statuses import REPORTED, MemberState
from controlplane.db.telemetry_aggregates import Aggregate

from .spec import Gates

if TYPE_CHECKING:
    from .eval_gate import DeviceEval

Verdict = Literal["pass", "fail", "wait"]


@dataclass(frozen=True)
class MemberView:
    """What a gate needs to know about one device of the rollout."""

    device_id: str
    tier: str | None
    state: MemberState
    #: ``passed``, ``failed`` or None (no health check seen)
    health: str | None


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, with what was measured and the threshold it was held to."""

    gate: str
    verdict: Verdict
    measured: float | None
    threshold: float | None
    tier: str | None = None
    note: str = ""

    def public(self) -> dict[str, object]:
        """As plain data (for JSON and the database)."""
        return asdict(self)

    def describe(self) -> str:
        """One line for a decision's reason."""
        where = f" [{self.tier}]" if self.tier else ""
        measured = "n/a" if self.measured is None else f"{self.measured:.4g}"
        threshold = "n/a" if self.threshold is None else f"{self.threshold:.4g}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.gate}{where}: measured {measured}, threshold {threshold}{note}"


def overall(results: Iterable[GateResult]) -> Verdict:
    """``fail`` if any gate failed, else ``wait`` if any waits, else ``pass``."""
    verdicts = {r.verdict for r in results}
    if "fail" in verdicts:
        return "fail"
    return "wait" if "wait" in verdicts else "pass"


def _install_gates(gates: Gates, members: Sequence[MemberView]) -> list[GateResult]:
    out = []
    reported = sum(m.state in REPORTED for m in members)
    failed = sum(m.state == MemberState.FAILED for m in members)
    if gates.min_devices_reporting is not None:
        # Never more than the stage holds: a stage of two cannot wait for three.
        need = min(gates.min_devices_reporting, len(members))
        out.append(GateResult(
            "min_devices_reporting", "pass" if reported >= need else "wait",
            reported, need, note=f"{reported} of {len(members)} device(s) finished their update",
        ))
    if gates.max_failed is not None:
        out.append(GateResult(
            "max_failed", "fail" if failed > gates.max_failed else "pass",
            failed, gates.max_failed,
        ))
    if gates.max_failed_pct is not None and members:
        pct = 100 * failed / len(members)
        out.append(GateResult(
            "max_failed_pct", "fail" if pct > gates.max_failed_pct else "pass",
            pct, gates.max_failed_pct,
        ))
    if gates.min_health_pass_rate is not None:
        checked = [m for m in members if m.health in ("passed", "failed")]
        if checked:
            rate = sum(m.health == "passed" for m in checked) / len(checked)
            out.append(GateResult(
                "min_health_pass_rate", "fail" if rate < gates.min_health_pass_rate else "pass",
                rate, gates.min_health_pass_rate, note=f"{len(checked)} health check(s)",
            ))
        else:
            out.append(GateResult(
                "min_health_pass_rate", "pass", None, gates.min_health_pass_rate,
                note="no health check reported yet",
            ))
    return out


def _ratio(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old <= 0:
        return None
    return new / old


def _tier_gates(
    gates: Gates, tier: str, new: Aggregate | None, old: Aggregate | None
) -> list[GateResult]:
    out: list[GateResult] = []
    has_new = new is not None and new.requests >= gates.min_requests
    has_old = old is not None and old.requests >= gates.min_requests
    # Without inference data on the new version a regression gate cannot
    # judge it, and passing blind would let a release that serves nothing (or
    # a broken load path) through: such gates wait. A missing baseline (every
    # device of the tier already moved) has nothing to compare with: passes.
    waiting_note = f"waiting for {gates.min_requests} request(s) on the new version"
    if gates.max_error_rate is not None:
        rate = new.error_rate if has_new and new is not None else None
        verdict: Verdict = ("wait" if rate is None
                            else "pass" if rate <= gates.max_error_rate else "fail")
        out.append(GateResult("max_error_rate", verdict, rate, gates.max_error_rate, tier,
                              "" if rate is not None else waiting_note))
    if gates.max_crashes is not None:
        crashes = (new.crashes + new.ooms) if new is not None else 0
        out.append(GateResult(
            "max_crashes", "fail" if crashes > gates.max_crashes else "pass",
            crashes, gates.max_crashes, tier,
        ))
    comparisons = (
        ("max_p95_latency_ratio", gates.max_p95_latency_ratio, "latency_p95_ms", True),
        ("min_tokens_per_s_ratio", gates.min_tokens_per_s_ratio, "tokens_per_s", False),
    )
    for name, threshold, metric, upper in comparisons:
        if threshold is None:
            continue
        if not has_new:
            out.append(GateResult(name, "wait", None, threshold, tier, waiting_note))
            continue
        if not has_old:
            out.append(GateResult(name, "pass", None, threshold, tier,
                                  "no inference data for the old version (baseline) in this tier"))
            continue
        assert new is not None and old is not None
        ratio = _ratio(getattr(new, metric), getattr(old, metric))
        if ratio is None:
            out.append(GateResult(name, "pass", None, threshold, tier, f"no {metric} reported"))
            continue
        bad = ratio > threshold if upper else ratio < threshold
        out.append(GateResult(
            name, "fail" if bad else "pass", ratio, threshold, tier,
            f"new {getattr(new, metric):.4g} vs old {getattr(old, metric):.4g} {metric}",
        ))
    return out


def evaluate(
    gates: Gates,
    members: Sequence[MemberView],
    new_by_tier: Mapping[str, Aggregate],
    old_by_tier: Mapping[str, Aggregate],
    evals: Mapping[str, DeviceEval] | None = None,
) -> list[GateResult]:
    """Every gate of ``gates`` over the rollout's assigned ``members`` so far.

    ``new_by_tier`` holds the new version's figures on the rollout's devices,
    ``old_by_tier`` the other versions' on devices of the same tier still on
    them; both keyed by device tier. ``evals`` holds each device's
    evaluation scores of both versions (the ``min_eval_ratio`` gate).
    """
    results = _install_gates(gates, members)
    tiers = sorted({m.tier for m in members if m.tier} | set(new_by_tier))
    for tier in tiers:
        results += _tier_gates(gates, tier, new_by_tier.get(tier), old_by_tier.get(tier))
    if gates.min_eval_ratio is not None:
        from .eval_gate import eval_gates

        results += eval_gates(gates.min_eval_ratio, members, evals or {})
    return results
