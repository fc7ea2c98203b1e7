"""Evaluation sets outside the rollout: the release spec's pin, the device's scoring loop,
its score cache and what telemetry carries."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

import protocol as p
from agent.healthcheck.eval_cache import MAX_ENTRIES, EvalCache, with_scores
from agent.healthcheck.evaluation import describe, score_model
from controlplane.release_spec import SpecError, build_manifest, load_spec
from protocol.eval_set import EvalItem

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2.eval.json"
GOLDEN = {"max_ttft_ms": 1000, "min_tokens_per_s": 0,
          "golden_prompts": [{"prompt": "hi", "expected": ["hi"]}]}


def test_the_example_set_parses_with_fifty_items_in_five_categories() -> None:
    items = p.parse_eval_set_bytes(EXAMPLE.read_bytes())
    assert len(items.items) == 50
    assert {i.category for i in items.items} == {"facts", "choice", "arith", "json",
                                                 "json-structured"}


def _spec(tmp_path: Path, eval_file: Path) -> Path:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    spec = tmp_path / "release.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "m", "version": "1.0.0",
        "variants": {"micro": {"file": "m.gguf", "format": "gguf", "parameters": 1,
                               "context_length": 512,
                               "health_check": GOLDEN}},
        "eval_set": {"path": eval_file.name, "time_budget_s": 30}}))
    return spec


def test_publishing_pins_the_eval_set_in_the_manifest(tmp_path: Path) -> None:
    eval_file = tmp_path / "set.json"
    eval_file.write_bytes(EXAMPLE.read_bytes())
    spec = load_spec(_spec(tmp_path, eval_file))
    manifest = build_manifest(spec, {p.Tier.MICRO: ("0" * 64, 64)}, released_at=time.time())
    ref = manifest.eval_set
    assert ref is not None
    assert (ref.artifact, ref.items, ref.time_budget_s) == ("m/1.0.0/eval/set.json", 50, 30)
    assert p.parse_eval_set(EXAMPLE.read_bytes(), ref).items[0].id == "fact-01"


def test_a_bad_eval_set_is_refused_before_anything_is_signed(tmp_path: Path) -> None:
    eval_file = tmp_path / "set.json"
    eval_file.write_text(json.dumps({"schema": "slmfleet.evalset/1", "items": [
        {"id": "a", "prompt": "?", "scorer": {"kind": "regex", "pattern": "("}}]}))
    spec = load_spec(_spec(tmp_path, eval_file))
    with pytest.raises(SpecError, match=r"eval_set\.path: .*pattern does not compile"):
        build_manifest(spec, {p.Tier.MICRO: ("0" * 64, 64)}, released_at=time.time())


def _items(n: int) -> p.EvalSet:
    return p.EvalSet.model_validate({"schema": "slmfleet.evalset/1", "items": [
        {"id": f"i{k}", "category": "even" if k % 2 == 0 else "odd", "prompt": f"q{k}",
         "scorer": {"kind": "exact", "expected": "yes"}} for k in range(n)]})


def test_scoring_stops_at_the_budget_and_counts_the_rest_as_failed() -> None:
    asked: list[str] = []

    async def ask(item: EvalItem) -> str | None:
        asked.append(item.id)
        await asyncio.sleep(0.05)
        return "yes" if item.category == "even" else "no"

    scores = asyncio.run(score_model(_items(40), 0.2, ask))
    assert scores["stopped_early"] is True
    assert 2 <= scores["run"] < 40 and scores["run"] == len(asked)
    assert scores["total"] == 40
    assert scores["score"] == pytest.approx(scores["passed"] / 40)
    assert "the rest count as failed" in describe(scores)
    # one result per item run, none for those the budget cut
    assert [r["id"] for r in scores["items"]] == asked
    assert [r["passed"] for r in scores["items"]] == [
        int(i[1:]) % 2 == 0 for i in asked]


def test_frozen_time_does_not_count_against_the_budget() -> None:
    async def ask(item: EvalItem) -> str | None:
        await asyncio.sleep(0.02)
        return None  # no answer: failed

    # Everything frozen: the budget never runs out, every item runs.
    scores = asyncio.run(score_model(_items(10), 0.01, ask, lambda a, b: b - a))
    assert (scores["run"], scores["passed"], scores["stopped_early"]) == (10, 0, False)
    assert scores["by_category"] == {"even": {"passed": 0, "run": 5},
                                     "odd": {"passed": 0, "run": 5}}
    assert scores["items"][0] == {"id": "i0", "passed": False, "answered": False}


def test_cache_keeps_scores_by_model_and_set_and_bounds_itself(tmp_path: Path) -> None:
    cache = EvalCache(tmp_path / "state" / "eval-scores.json")
    assert cache.get("a" * 64, "e" * 64) is None
    cache.put("a" * 64, "e" * 64, {"score": 0.5})
    cache.put("a" * 64, "f" * 64, {"score": 0.7})
    assert EvalCache(cache.path).get("a" * 64, "e" * 64) == {"score": 0.5}
    assert cache.latest("a" * 64) == {"score": 0.7}
    for k in range(MAX_ENTRIES + 3):
        cache.put(f"{k:064x}", "e" * 64, {"score": 0.1})
    assert len(json.loads(cache.path.read_text())) == MAX_ENTRIES
    cache.path.write_text("{not json")
    assert cache.get("a" * 64, "e" * 64) is None  # unreadable: empty, scored again


def test_telemetry_carries_each_active_versions_latest_score(tmp_path: Path) -> None:
    cache = EvalCache(tmp_path / "eval-scores.json")
    cache.put("a" * 64, "e" * 64, {"score": 0.9, "passed": 9, "run": 10, "total": 10,
                                   "by_category": {"facts": {"passed": 9, "run": 10}}})
    active = [p.ActiveModel(name="m", version="1.0.0", tier=p.Tier.MICRO, sha256="a" * 64)]
    stats = [p.InferenceStats(model="m", version="1.0.0", requests=3),
             p.InferenceStats(model="m", version="0.9.0")]
    scored, other = with_scores(stats, cache, active)
    assert scored.eval_score == 0.9
    assert scored.eval_by_category == {"facts": p.CategoryScore(passed=9, run=10)}
    assert other.eval_score is None
    wire = p.decode("telemetry", p.encode(p.Telemetry(
        device_id="d1", ts=1.0, seq=1, uptime_s=1, cpu_percent=1, ram_used_bytes=1,
        inference=[scored])))
    assert wire.inference[0].eval_score == 0.9
