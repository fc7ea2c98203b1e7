"""The health check's added time from an evaluation set, and each model's score on it.

Runs the agent's own one-off health check (``python -m agent.healthcheck``,
the same rules and scoring the candidate worker runs) on the SmolLM2-135M
GGUF twice: with the demo's golden prompts only, then with the 50-item
``examples/smollm2.eval.json`` as well. The difference is what the
evaluation adds to a device's health check; per-item times show what
dominates. With ``--low`` the demo's low-quality variant (Q2_K, built
into the cache on first use) is scored too. For each model a line gives
the score per category and the items that failed, with the JSON the
``json_schema`` scorer extracted from each (null: none found).

The last line is the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import report

from agent.healthcheck import HealthRequest, SubprocessHealthChecker
from agent.profiles import RuntimeSettings
from agent.runtime_settings import runtime_from_defaults
from controlplane.devfleet.demo_specs import DEMO_EVAL_SET
from controlplane.devfleet.low_quality import low_quality_model
from controlplane.devfleet.model_cache import smollm2_path
from protocol import HealthCheck, RuntimeDefaults, parse_eval_set_bytes

GOLDEN = HealthCheck.model_validate({"max_ttft_ms": 60000, "min_tokens_per_s": 0,
                                     "golden_prompts": [
    {"prompt": "What is the capital of Germany?", "expected": ["Berlin"], "max_tokens": 32},
    {"prompt": "What is the opposite of hot?", "expected": ["cold"], "max_tokens": 32}]})


async def _check(model: Path, threads: int, eval_file: Path | None) -> tuple[float, dict]:
    runtime = runtime_from_defaults(RuntimeSettings(threads=threads),
                                    RuntimeDefaults(context=2048), 2048)
    items = parse_eval_set_bytes(eval_file.read_bytes()) if eval_file else None
    request = HealthRequest(model=model, format="gguf", runtime=runtime, spec=GOLDEN,
                            eval_set=items, eval_sha256="0" * 64 if items else None,
                            eval_budget_s=600.0)
    started = time.perf_counter()
    result = await SubprocessHealthChecker(900).check(request, asyncio.Event())
    elapsed = time.perf_counter() - started
    if not result.passed:
        raise SystemExit(f"health check of {model.name} failed: {result.reason}")
    return elapsed, result.details


def _per_model(label: str, scores: dict) -> str:
    """One line: the categories' scores and the failed items (with what was extracted)."""
    failed = {item["id"]: item.get("extracted") for item in scores["items"]
              if not item["passed"]}
    return json.dumps({label: scores["by_category"], "failed": failed})


def main() -> None:
    """Measure and report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-set", type=Path, default=DEMO_EVAL_SET)
    parser.add_argument("--low", action="store_true", help="score the low-quality variant too")
    args = parser.parse_args()
    model = smollm2_path()
    figures: dict[str, float | int | str] = {"threads": args.threads}
    plain_s, _ = asyncio.run(_check(model, args.threads, None))
    full_s, details = asyncio.run(_check(model, args.threads, args.eval_set))
    scores = details["eval"]
    figures |= {
        "check_s": round(plain_s, 2),
        "check_with_eval_s": round(full_s, 2),
        "eval_added_s": round(full_s - plain_s, 2),
        "eval_items": scores["total"],
        "eval_run_s": scores["elapsed_s"],
        "per_item_ms": round(1000 * scores["elapsed_s"] / max(scores["run"], 1), 1),
        "score_q4_1": scores["score"],
    }
    print(_per_model("Q4_1", scores), flush=True)
    if args.low:
        _, low = asyncio.run(_check(low_quality_model(model), args.threads, args.eval_set))
        figures |= {"score_q2_k": low["eval"]["score"],
                    "eval_run_s_q2_k": low["eval"]["elapsed_s"]}
        print(_per_model("Q2_K", low["eval"]), flush=True)
    report(figures)


if __name__ == "__main__":
    main()
