"""Structured output judged on the device: evaluation items with a ``response_format``
scored on the real SmolLM2-135M in each place the agent scores a set: the candidate
worker during the health check, the serving worker for the active version's baseline,
and the one-off health-check child.

One item's schema admits a single value the model would never write by itself, so
it passes only when the format was sent and enforced; one item's schema uses a
keyword the agent's grammar cannot enforce, so it fails alone while the rest of the
set is still scored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import protocol as p
from agent.healthcheck import HealthRequest, HealthResult, SubprocessHealthChecker
from agent.healthcheck.eval_cache import EvalCache
from agent.healthcheck.in_worker import WorkerHealthChecker
from agent.inference.runtime import InferenceRuntime
from agent.inference.spec import ModelSpec
from agent.profiles import RuntimeSettings
from agent.runtime_settings import EffectiveRuntime

pytestmark = pytest.mark.integration

NAME = "smollm2"
ACTIVE_SHA, CANDIDATE_SHA, SET_SHA = "a" * 64, "b" * 64, "e" * 64
RUNTIME = EffectiveRuntime(threads=1, gpu_layers=0, batch=None, context=512, mmap=True,
                           embeddings=False)
GOLDEN = p.HealthCheck.model_validate({"max_ttft_ms": 60000, "min_tokens_per_s": 0,
                                       "golden_prompts": [
    {"prompt": "What is the capital of Germany?", "expected": ["Berlin"], "max_tokens": 16}]})


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": sorted(properties),
            "additionalProperties": False}


ITEMS = [
    # free text: the scorer takes the object out of whatever the model writes around it
    {"id": "raw", "category": "json", "max_tokens": 32,
     "prompt": 'Reply with only a JSON object with a key "name" whose value is "Alice".',
     "scorer": {"kind": "json_schema", "schema": {"type": "object"}}},
    # only the enforced grammar can produce this answer
    {"id": "forced", "category": "json-structured", "max_tokens": 24,
     "prompt": "What is 2 + 2?",
     "response_format": {"type": "json_schema", "json_schema": {
         "name": "answer", "schema": _object({"answer": {"enum": ["zebra-7"]}})}},
     "scorer": {"kind": "json_schema", "schema": {
         "required": ["answer"], "properties": {"answer": {"const": "zebra-7"}}}}},
    # a valid JSON Schema whose keyword (pattern) the grammar cannot enforce
    {"id": "unenforceable", "category": "json-structured", "max_tokens": 24,
     "prompt": "Say hello as JSON.",
     "response_format": {"type": "json_schema", "json_schema": {
         "name": "greeting", "schema": _object({"greeting": {"type": "string",
                                                             "pattern": "^h"}})}},
     "scorer": {"kind": "json_schema", "schema": {"type": "object"}}},
    {"id": "object", "category": "json-structured", "max_tokens": 32,
     "prompt": 'Write a JSON object with the key "fruit" and the value "banana".',
     "response_format": {"type": "json_object"},
     "scorer": {"kind": "json_schema", "schema": {"type": "object"}}},
]
EVAL_SET = p.EvalSet.model_validate({"schema": "slmfleet.evalset/1", "items": ITEMS})


def _request(model: Path, **extra: Any) -> HealthRequest:
    return HealthRequest(model=model, format="gguf", runtime=RUNTIME, spec=GOLDEN,
                         eval_set=EVAL_SET, eval_sha256=SET_SHA, eval_budget_s=300.0,
                         **extra)


def _assert_judged(scores: dict[str, Any]) -> None:
    """The per-item results of one run over ITEMS (see the module docstring)."""
    results = {r["id"]: r for r in scores["items"]}
    assert list(results) == [i["id"] for i in ITEMS]
    assert results["forced"]["passed"], results
    assert json.loads(results["forced"]["extracted"]) == {"answer": "zebra-7"}
    assert results["unenforceable"] == {"id": "unenforceable", "passed": False,
                                        "answered": False}
    # a grammar-bound answer is the object and nothing else
    assert isinstance(json.loads(results["object"]["extracted"]), dict), results
    assert results["raw"]["passed"] and results["raw"]["extracted"].startswith("{"), results
    assert scores["by_category"]["json-structured"]["run"] == 3
    assert (scores["run"], scores["total"]) == (4, 4)


def test_the_candidate_and_the_active_version_are_judged_under_each_items_format(
    model_path: Path, tmp_path: Path,
) -> None:
    cache = EvalCache(tmp_path / "eval-scores.json")

    async def run() -> HealthResult:
        runtime = InferenceRuntime()
        try:
            await runtime.serve(ModelSpec(f"{NAME}@1.0.0-micro", NAME, "1.0.0", "gguf",
                                          model_path, RUNTIME, ACTIVE_SHA))
            checker = WorkerHealthChecker(runtime, RuntimeSettings(threads=1), 600, cache)
            return await checker.check(_request(
                model_path, key=f"{NAME}@2.0.0-micro", name=NAME, version="2.0.0",
                sha256=CANDIDATE_SHA, active_sha256=ACTIVE_SHA), asyncio.Event())
        finally:
            await runtime.close()

    result = asyncio.run(run())
    assert result.passed, result.reasons
    _assert_judged(result.details["eval"])  # the candidate worker (check_prompt)
    _assert_judged(result.details["eval_active"])  # the serving worker (complete)
    # the cache keeps the scores that events and telemetry carry, not the items
    for sha in (ACTIVE_SHA, CANDIDATE_SHA):
        cached = cache.get(sha, SET_SHA)
        assert cached is not None and "items" not in cached
        assert p.EvalScores.model_validate(cached).run == 4


def test_the_one_off_health_check_judges_the_same_way(model_path: Path) -> None:
    result = asyncio.run(SubprocessHealthChecker(600).check(_request(model_path),
                                                            asyncio.Event()))
    assert result.passed, result.reasons
    _assert_judged(result.details["eval"])
