"""Health check of a staged model in a one-off child, ``python -m agent.healthcheck``.

A standalone form of the check the inference worker runs before a model
takes traffic (:mod:`agent.healthcheck.rules`): load the model with the same
backend, run the same rules, exit. The agent itself checks in the worker
that will serve the model (:class:`agent.healthcheck.in_worker.WorkerHealthChecker`);
this entry point serves :class:`agent.healthcheck.SubprocessHealthChecker`.

Reads one JSON request on stdin::

    {"model": "/path/to/model", "format": "gguf",
     "runtime": {"threads": 2, "gpu_layers": 0, "batch": null, "context": 2048,
                 "mmap": true, "embeddings": false},
     "health_check": {...the variant's HealthCheck...}}

and writes one JSON object on stdout (exit status 0 whenever the check ran,
passed or not)::

    {"passed": true, "reasons": [], "load_ms": 160.2, "ttft_ms_max": 88.1,
     "tokens_per_s": 121.4, "prompts": [{"ttft_ms": ..., "tokens": ..., "matched": "4",
                                         "answer": "..."}]}
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ..child_lifetime import die_with, parent_from


def _fail(reason: str) -> dict[str, Any]:
    return {"passed": False, "reasons": [reason]}


def run_check(request: dict[str, Any]) -> dict[str, Any]:
    """Run the check a request describes; never raises for a bad model."""
    from ..inference.backend import load_backend
    from .rules import run_golden

    runtime = {"onnx_providers": [], **request["runtime"]}
    started = time.perf_counter()
    try:
        backend = load_backend(request["model"], request["format"], runtime)
    except (ValueError, RuntimeError, OSError) as exc:
        return _fail(f"model does not load: {exc}")
    load_ms = round((time.perf_counter() - started) * 1000, 1)
    result = {**run_golden(backend, request["health_check"]), "load_ms": load_ms}
    if result["passed"] and request["health_check"].get("eval"):
        result["eval"] = _evaluate(backend, request["health_check"]["eval"])
    return result


def _evaluate(backend: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Score the loaded model on the evaluation set the request carries."""
    import asyncio

    from .evaluation import eval_set_of, item_request, score_model
    from .rules import run_prompt

    async def ask(item: Any) -> str | None:
        return run_prompt(backend, item_request(item)).get("answer")

    return asyncio.run(score_model(eval_set_of(spec), spec["time_budget_s"], ask))


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[--parent PID]``, request on stdin, result on stdout."""
    die_with(parent_from(sys.argv[1:] if argv is None else argv))
    # Keep fd 1 for the result alone: anything native code prints goes to stderr.
    result_fd = os.dup(1)
    os.dup2(2, 1)
    request = json.loads(sys.stdin.read(1 << 20))
    result = run_check(request)
    with os.fdopen(result_fd, "w") as out:
        out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
