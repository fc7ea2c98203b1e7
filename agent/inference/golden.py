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
from typing import Any

from .backend import Backend, BadRequest

#: answers are cut to this many characters in the result (they end up in logs)
ANSWER_CHARS = 200


def _run_prompt(backend: Backend, prompt: str, max_tokens: int) -> tuple[str, float, int, float]:
    """(answer, ttft_s, pieces, decode_s) of one greedy chat completion."""
    start = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []

    def emit(text: str) -> None:
        stamps.append(time.perf_counter())
        parts.append(text)

    backend.complete(
        {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
         "max_tokens": max_tokens, "seed": 0},
        emit, lambda: False,
    )
    if not stamps:
        return "", time.perf_counter() - start, 0, 0.0
    return "".join(parts), stamps[0] - start, len(parts), stamps[-1] - stamps[0]


def _check_embeddings(backend: Backend, spec: dict[str, Any]) -> dict[str, Any]:
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


def run_golden(backend: Backend, spec: dict[str, Any]) -> dict[str, Any]:
    """Check ``backend`` against a variant's ``health_check`` (as a plain dict)."""
    if backend.embeddings:
        return _check_embeddings(backend, spec)
    golden = spec.get("golden_prompts") or []
    reasons: list[str] = []
    prompts: list[dict[str, Any]] = []
    tokens_after_first = 0
    decode_s = 0.0
    for i, item in enumerate(golden, 1):
        try:
            answer, ttft_s, tokens, decode = _run_prompt(backend, item["prompt"],
                                                        item.get("max_tokens", 64))
        except BadRequest as exc:
            # Fail closed: a model that cannot answer its golden prompts takes no traffic.
            reasons.append(f"prompt {i}: {exc}")
            continue
        expected = item["expected"]
        matched = next((e for e in expected if e.lower() in answer.lower()), None)
        ttft_ms = ttft_s * 1000
        if not answer:
            reasons.append(f"prompt {i}: no output")
        elif matched is None:
            reasons.append(f"prompt {i}: answer {answer[:80]!r} contains none of {expected}")
        if ttft_ms > spec["max_ttft_ms"]:
            reasons.append(
                f"prompt {i}: time to first token {ttft_ms:.0f} ms > {spec['max_ttft_ms']:g} ms"
            )
        tokens_after_first += max(tokens - 1, 0)
        decode_s += decode
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
