"""The pure parts of rollouts: spec validation, cohorts, gate verdicts, metric sums."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controlplane.db.telemetry_aggregates import aggregate
from controlplane.rollouts import Gates, RolloutSpec
from controlplane.rollouts.cohort import cohort_key, stage_size
from controlplane.rollouts.gates import MemberView, evaluate, overall


def test_cohort_order_is_stable_and_independent_of_the_rest_of_the_fleet() -> None:
    fleet = [f"dev-{i}" for i in range(200)]
    order = sorted(fleet, key=lambda d: cohort_key("r-1", d))
    grown = sorted([*fleet, "dev-new-1", "dev-new-2"], key=lambda d: cohort_key("r-1", d))
    assert [d for d in grown if d in set(fleet)] == order
    # Another rollout draws another canary.
    assert sorted(fleet, key=lambda d: cohort_key("r-2", d))[:10] != order[:10]
    assert [stage_size(p, 20) for p in (1, 10, 50, 100)] == [1, 2, 10, 20]
    assert stage_size(10, 0) == 0 and stage_size(33.3, 3) == 1


def test_spec_defaults_and_per_stage_gates() -> None:
    spec = RolloutSpec.model_validate({
        "model": "m", "version": "1.0.0", "target": {"all": True},
        "stages": [{"percent": 5, "gates": {"max_failed": 2}}, {"percent": 100}],
    })
    assert spec.gates_for(0).max_failed == 2 and spec.gates_for(1).max_failed == 0
    assert spec.on_failure == "rollback"
    with pytest.raises(ValidationError, match="drop the other criteria"):
        RolloutSpec.model_validate({"model": "m", "version": "1", "stages": [{"percent": 100}],
                                    "target": {"all": True, "tiers": ["micro"]}})


def _members(states: list[tuple[str, str | None]]) -> list[MemberView]:
    return [MemberView(f"d{i}", "micro", s, h) for i, (s, h) in enumerate(states)]


def test_install_gates_wait_fail_and_pass() -> None:
    gates = Gates(min_devices_reporting=2, max_failed=0, min_health_pass_rate=1.0)
    waiting = evaluate(gates, _members([("succeeded", "passed"), ("assigned", None),
                                        ("assigned", None)]), {}, {})
    assert overall(waiting) == "wait"
    failing = evaluate(gates, _members([("succeeded", "passed"), ("failed", "failed")]), {}, {})
    assert overall(failing) == "fail"
    verdicts = {r.gate: (r.verdict, r.measured) for r in failing}
    assert verdicts["max_failed"] == ("fail", 1)
    assert verdicts["min_health_pass_rate"] == ("fail", 0.5)
    assert overall(evaluate(gates, _members([("succeeded", "passed")] * 2), {}, {})) == "pass"


def test_regression_gates_compare_within_a_tier() -> None:
    def rows(version: str, tps: float, p95: float, errors: int = 0) -> list:
        entry = {"model": "m", "version": version, "requests": 10, "errors": errors,
                 "tokens_per_s": tps, "latency_p95_ms": p95}
        return [(f"{version}-{i}", "micro", [entry]) for i in range(3)]

    new = {t: a for (_, _, t), a in aggregate(rows("2", 40, 500, errors=2), model="m").items()}
    old = {t: a for (_, _, t), a in aggregate(rows("1", 80, 400), model="m").items()}
    gates = Gates(min_tokens_per_s_ratio=0.8, max_p95_latency_ratio=1.5, max_error_rate=0.1)
    results = {r.gate: r for r in evaluate(gates, _members([("succeeded", "passed")]), new, old)}
    assert results["min_tokens_per_s_ratio"].verdict == "fail"
    assert results["min_tokens_per_s_ratio"].measured == pytest.approx(0.5)
    assert results["max_p95_latency_ratio"].verdict == "pass"
    assert results["max_error_rate"].verdict == "fail"
    assert results["max_error_rate"].measured == pytest.approx(0.2)
    # No baseline in the tier: reported, not failed.
    lonely = {r.gate: r for r in evaluate(gates, _members([("succeeded", None)]), new, {})}
    assert lonely["min_tokens_per_s_ratio"].verdict == "pass"
    assert "baseline" in lonely["min_tokens_per_s_ratio"].note
    # No data on the new version: the gates cannot judge it, so the stage waits.
    unserved = evaluate(gates, _members([("succeeded", "passed")]), {}, old)
    assert {r.gate: r.verdict for r in unserved if r.tier == "micro"} == {
        "max_error_rate": "wait", "max_p95_latency_ratio": "wait",
        "min_tokens_per_s_ratio": "wait"}
    assert overall(unserved) == "wait"


def test_metric_sums_weight_percentiles_by_requests() -> None:
    rows = [("a", "small", [{"model": "m", "version": "1", "requests": 9, "tokens_per_s": 10.0,
                             "crashes": 1}]),
            ("b", "small", [{"model": "m", "version": "1", "requests": 1, "tokens_per_s": 100.0},
                            {"model": "other", "version": "1", "requests": 5}])]
    (agg,) = aggregate(rows, model="m").values()
    assert (agg.devices, agg.requests, agg.crashes) == (2, 10, 1)
    assert agg.tokens_per_s == pytest.approx((9 * 10 + 100) / 10)
