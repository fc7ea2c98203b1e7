"""The ``min_eval_ratio`` gate's arithmetic and the score table, from plain values."""

from __future__ import annotations

import pytest

from controlplane.db.statuses import MemberState
from controlplane.rollouts.eval_gate import DeviceEval, eval_gates, tier_scores
from controlplane.rollouts.eval_scores import device_eval, score_table
from controlplane.rollouts.gates import MemberView, evaluate, overall
from controlplane.rollouts.queries import Member
from controlplane.rollouts.spec import Gates, RolloutSpec

S, A = MemberState.SUCCEEDED, MemberState.ASSIGNED


def view(device: str, tier: str = "micro", state: MemberState = S) -> MemberView:
    return MemberView(device, tier, state, "passed")


def test_ratio_is_summed_new_over_summed_old_per_tier() -> None:
    members = [view("a"), view("b"), view("c", "small")]
    evals = {"a": DeviceEval("a", 0.5, 1.0), "b": DeviceEval("b", 0.9, 0.8),
             "c": DeviceEval("c", 0.9, 0.9)}
    scores = tier_scores(members, evals)
    assert scores["micro"].devices == 2
    assert scores["micro"].ratio == pytest.approx((0.5 + 0.9) / (1.0 + 0.8))
    assert scores["small"].ratio == pytest.approx(1.0)

    results = {r.tier: r for r in eval_gates(0.9, members, evals)}
    assert results["micro"].verdict == "fail"
    assert results["micro"].measured == pytest.approx(1.4 / 1.8)
    assert "new 0.700 vs old 0.900 on 2 device(s)" in results["micro"].note
    assert results["small"].verdict == "pass"


def test_ratio_exactly_at_the_threshold_passes() -> None:
    evals = {"a": DeviceEval("a", 0.45, 0.5)}
    [result] = eval_gates(0.9, [view("a")], evals)
    assert (result.verdict, result.measured) == ("pass", pytest.approx(0.9))


def test_devices_without_a_baseline_are_left_out_of_the_pairs() -> None:
    members = [view("a"), view("b")]
    evals = {"a": DeviceEval("a", 0.2, None), "b": DeviceEval("b", 0.8, 0.8)}
    [result] = eval_gates(0.95, members, evals)
    assert result.verdict == "pass"
    assert "on 1 device(s)" in result.note


def test_no_scores_waits_while_devices_update_then_passes_with_a_note() -> None:
    [waiting] = eval_gates(0.9, [view("a", state=A)], {})
    assert waiting.verdict == "wait"
    [passed] = eval_gates(0.9, [view("a")], {})
    assert passed.verdict == "pass"
    assert passed.measured is None
    assert "no device reported" in passed.note


def test_old_version_scoring_zero_passes_without_a_ratio() -> None:
    [result] = eval_gates(0.9, [view("a")], {"a": DeviceEval("a", 0.0, 0.0)})
    assert result.verdict == "pass"
    assert result.measured is None


def test_evaluate_adds_the_gate_only_when_set() -> None:
    members = [view("a")]
    evals = {"a": DeviceEval("a", 0.3, 0.9)}
    plain = evaluate(Gates(), members, {}, {}, evals)
    assert "min_eval_ratio" not in {r.gate for r in plain}
    gated = evaluate(Gates(min_eval_ratio=0.9), members, {}, {}, evals)
    assert overall(gated) == "fail"
    failed = [r for r in gated if r.verdict == "fail"]
    assert [r.gate for r in failed] == ["min_eval_ratio"]
    assert "measured 0.3333, threshold 0.9" in failed[0].describe()


def test_spec_takes_the_gate_and_refuses_a_bad_value() -> None:
    base = {"model": "m", "version": "1.0.0", "target": {"all": True},
            "stages": [{"percent": 100}]}
    spec = RolloutSpec.model_validate({**base, "gates": {"min_eval_ratio": 0.95}})
    assert spec.gates_for(0).min_eval_ratio == 0.95
    with pytest.raises(ValueError, match="min_eval_ratio"):
        RolloutSpec.model_validate({**base, "gates": {"min_eval_ratio": 0}})


def outcome(new: float, old: float | None) -> dict:
    def side(score: float) -> dict:
        return {"score": score, "passed": int(score * 10), "run": 10, "total": 10,
                "by_category": {"facts": {"passed": int(score * 10), "run": 10}}}

    out = {"eval_sha256": "e" * 64, "candidate": side(new)}
    if old is not None:
        out |= {"active_sha256": "a" * 64, "active": side(old)}
    return out


def test_score_table_groups_new_and_old_versions_per_tier() -> None:
    members = [
        Member("a", "micro", S, 0, "x-a", "m@1.0.0", "passed", None),
        Member("b", "micro", S, 0, "x-b", "m@1.0.0", "passed", None),
        Member("c", "small", S, 0, "x-c", None, "passed", None),
    ]
    evals = {"a": device_eval("a", outcome(0.6, 0.9)), "b": device_eval("b", outcome(0.8, 0.9)),
             "c": device_eval("c", outcome(0.5, None))}
    table = {(r["tier"], r["role"]): r for r in score_table(members, evals, "2.0.0")}
    assert set(table) == {("micro", "new"), ("micro", "old"), ("small", "new")}
    assert table["micro", "new"]["score"] == pytest.approx(0.7)
    assert table["micro", "new"]["version"] == "2.0.0"
    assert table["micro", "old"] | {"score": 0} == {
        "tier": "micro", "version": "1.0.0", "role": "old", "devices": 2, "score": 0,
        "by_category": {"facts": {"passed": 18, "run": 20}}}
    assert table["small", "new"]["devices"] == 1


def test_an_unreadable_event_is_ignored() -> None:
    assert device_eval("a", {"candidate": "nonsense"}) is None


def test_a_check_cut_short_by_its_budget_is_judged_on_the_items_it_ran() -> None:
    """Seen on a busy device: the candidate ran 31 of 50 items (22 passed), the old
    version 22 (all passed); both report 22/50 = 0.44, a ratio of 1.0 that would
    pass a release that answers far worse. Judged on what each ran, it fails."""
    new = {"facts": (7, 8), "choice": (6, 8), "arith": (4, 6), "json": (5, 9)}
    old = {"facts": (5, 5), "choice": (5, 5), "arith": (5, 5), "json": (7, 7)}
    evals = {"a": DeviceEval("a", 0.44, 0.44, new, old, stopped_early=True)}
    [result] = eval_gates(0.9, [view("a")], evals)
    assert result.verdict == "fail"
    assert result.measured == pytest.approx((22 / 31) / 1.0)
    assert "within its time budget" in result.note


def test_whole_runs_keep_the_reported_scores() -> None:
    """With every item run on both sides, the passed share is the reported score."""
    by_category = {"facts": (9, 10), "json": (4, 5)}
    evals = {"a": DeviceEval("a", 13 / 15, 14 / 15, by_category,
                             {"facts": (10, 10), "json": (4, 5)})}
    [result] = eval_gates(0.9, [view("a")], evals)
    assert result.measured == pytest.approx(13 / 14)
    assert "time budget" not in result.note
