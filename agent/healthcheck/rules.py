"""The health check a model must pass before it takes traffic (worker side).

Rules, from the variant's ``health_check``: every golden prompt's answer,
as a chat message at temperature 0, contains one of its ``expected``
strings (case-insensitive); every prompt's time to first token is at most
``max_ttft_ms``; decode throughput over all prompts together (tokens after
the first, over the time after the first) is at least ``min_tokens_per_s``
(0: not gated). An embedding model embeds one short text within
``max_ttft_ms``. A model that only runs by name (generic ONNX) passes by
loading, unless the variant names golden prompts it cannot answer.

It runs in the worker that will serve the model, on the very backend that
will serve it: what passed is what takes traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..inference.backend import Backend, BadRequest

#: answers are cut to this many characters in the result (they end up in logs)
ANSWER_CHARS = 200

#: seconds a worker was kept from running within [start, end] (see agent.inference.candidate_freeze)
Frozen = Callable[[float, float], float]


def _never_frozen(start: float, end: float) -> float:
    return 0.0


def check_embeddings(backend: Backend, spec: dict[str, Any]) -> dict[str, Any]:
    """The check of an embedding model: one short text embeds, within ``max_ttft_ms``."""
    reasons: list[str] = []
    t0 = time.perf_counter()
    vectors, _ = backend.embed(["health check"])
    ms = (time.perf_counter() - t0) * 1000
    if not vectors or not vectors[0]:
        reasons.append("embedding is empty")
    if ms > spec["max_ttft_ms"]:
        reasons.append(f"embedding took {ms:.0f} ms > {spec['max_ttft_ms']:g} ms")
    return {"passed": not reasons, "reasons": reasons, "ttft_ms_max": round(ms, 1),
            "tokens_per_s": None, "prompts": []}


def run_prompt(backend: Backend, item: dict[str, Any]) -> dict[str, Any]:
    """Run one golden prompt as a greedy chat completion; :func:`judge` judges it.

    The times are stamps on the monotonic clock, which the agent shares: it
    subtracts the intervals it kept the worker frozen (a warm swap's
    candidate runs only between the serving worker's requests), so each
    prompt is its own call.
    """
    stamps: list[float] = []
    parts: list[str] = []

    def emit(text: str) -> None:
        stamps.append(time.monotonic())
        parts.append(text)

    started = time.monotonic()
    try:
        backend.complete(
            {"messages": [{"role": "user", "content": item["prompt"]}], "temperature": 0.0,
             "max_tokens": item.get("max_tokens", 64), "seed": 0,
             # an evaluation item's structured-output format (golden prompts have none)
             "response_format": item.get("response_format")},
            emit, lambda: False,
        )
    except BadRequest as exc:
        return {"error": str(exc)}
    return {"answer": "".join(parts), "tokens": len(parts), "started": started,
            "first": stamps[0] if stamps else None, "last": stamps[-1] if stamps else None,
            "ended": time.monotonic()}


def judge(spec: dict[str, Any], outcomes: list[dict[str, Any]],
          frozen: Frozen = _never_frozen) -> dict[str, Any]:
    """The check's result from :func:`run_prompt`'s outcomes, one per golden prompt in order.

    ``frozen`` tells how long the worker was kept from running in a span of
    time; that time counts neither as waiting for the first token nor as decoding.
    """
    golden = spec.get("golden_prompts") or []
    reasons: list[str] = []
    prompts: list[dict[str, Any]] = []
    tokens_after_first = 0
    decode_s = 0.0
    for i, (item, outcome) in enumerate(zip(golden, outcomes, strict=True), 1):
        if "error" in outcome:
            # Fail closed: a model that cannot answer its golden prompts takes no traffic.
            reasons.append(f"prompt {i}: {outcome['error']}")
            continue
        answer, tokens, first = outcome["answer"], outcome["tokens"], outcome["first"]
        ttft_end = first if first is not None else outcome["ended"]
        ttft_ms = (ttft_end - outcome["started"] - frozen(outcome["started"], ttft_end)) * 1000
        expected = item["expected"]
        matched = next((e for e in expected if e.lower() in answer.lower()), None)
        if not answer:
            reasons.append(f"prompt {i}: no output")
        elif matched is None:
            reasons.append(f"prompt {i}: answer {answer[:80]!r} contains none of {expected}")
        if ttft_ms > spec["max_ttft_ms"]:
            reasons.append(
                f"prompt {i}: time to first token {ttft_ms:.0f} ms > {spec['max_ttft_ms']:g} ms"
            )
        tokens_after_first += max(tokens - 1, 0)
        if first is not None:
            decode_s += outcome["last"] - first - frozen(first, outcome["last"])
        prompts.append({"ttft_ms": round(ttft_ms, 1), "tokens": tokens, "matched": matched,
                        "answer": answer[:ANSWER_CHARS]})
    tokens_per_s = tokens_after_first / decode_s if decode_s > 0 else None
    minimum = spec.get("min_tokens_per_s", 0.0)
    if golden and minimum > 0:
        if tokens_per_s is None:
            reasons.append("too few tokens to measure decode throughput")
        elif tokens_per_s < minimum:
            reasons.append(f"decode {tokens_per_s:.1f} tokens/s < {minimum:g} tokens/s")
    return {
        "passed": not reasons,
        "reasons": reasons,
        "ttft_ms_max": max((p["ttft_ms"] for p in prompts), default=None),
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s is not None else None,
        "prompts": prompts,
    }


def run_golden(backend: Backend, spec: dict[str, Any]) -> dict[str, Any]:
    """Check ``backend`` against a variant's ``health_check`` (as a plain dict), all at once."""
    if backend.embeddings:
        return check_embeddings(backend, spec)
    return judge(spec, [run_prompt(backend, item) for item in spec.get("golden_prompts") or []])
