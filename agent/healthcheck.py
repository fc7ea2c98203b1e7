"""Health check of a staged model, run as ``python -m agent.healthcheck``.

The agent starts this in a subprocess (:mod:`agent.health`) so that
llama.cpp never loads into the agent itself: its RSS stays small, and a
native crash or an OOM kill takes down this process, not the agent. Issue 4
moves the check into the inference worker; the request and result shapes
stay the same.

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

Rules (the variant's ``health_check``): every golden prompt's answer, at
temperature 0, contains one of its ``expected`` strings (case-insensitive);
every prompt's time to first token is at most ``max_ttft_ms``; decode
throughput over all prompts together (tokens after the first, over the time
after the first) is at least ``min_tokens_per_s``. An embedding model is
checked by loading it and embedding one short text within ``max_ttft_ms``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocol import HealthCheck

#: answers are cut to this many characters in the result (they end up in logs)
ANSWER_CHARS = 200


def _fail(reason: str, **extra: Any) -> dict[str, Any]:
    return {"passed": False, "reasons": [reason], **extra}


def _run_prompt(llm: Any, prompt: str, max_tokens: int) -> tuple[str, float, int, float]:
    """(answer, ttft_s, tokens, decode_s) of one greedy chat completion."""
    start = time.perf_counter()
    first = last = None
    parts: list[str] = []
    stream = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}],
        temperature=0.0,
        max_tokens=max_tokens,
        stream=True,
    )
    for chunk in stream:
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            last = time.perf_counter()
            if first is None:
                first = last
            parts.append(delta)
    if first is None or last is None:
        return "", time.perf_counter() - start, 0, 0.0
    return "".join(parts), first - start, len(parts), last - first


def check_gguf(model: str, runtime: dict[str, Any], spec: HealthCheck) -> dict[str, Any]:
    """Load the GGUF with llama.cpp and run ``spec`` against it."""
    import llama_cpp  # here, never in the agent: see the module docstring

    started = time.perf_counter()
    kwargs: dict[str, Any] = {
        "model_path": model,
        "n_ctx": runtime["context"],
        "n_threads": runtime["threads"],
        "n_gpu_layers": runtime["gpu_layers"],
        "use_mmap": runtime["mmap"],
        "embedding": runtime["embeddings"],
        "seed": 0,
        "verbose": False,
    }
    if runtime.get("batch"):
        kwargs["n_batch"] = runtime["batch"]
    try:
        llm = llama_cpp.Llama(**kwargs)
    except (ValueError, RuntimeError) as exc:
        return _fail(f"model does not load: {exc}")
    load_ms = (time.perf_counter() - started) * 1000
    reasons: list[str] = []

    if runtime["embeddings"]:
        t0 = time.perf_counter()
        vector = llm.embed("health check")
        ms = (time.perf_counter() - t0) * 1000
        if not vector:
            reasons.append("embedding is empty")
        if ms > spec.max_ttft_ms:
            reasons.append(f"embedding took {ms:.0f} ms > {spec.max_ttft_ms:g} ms")
        return {"passed": not reasons, "reasons": reasons, "load_ms": round(load_ms, 1),
                "ttft_ms_max": round(ms, 1), "tokens_per_s": None, "prompts": []}

    prompts: list[dict[str, Any]] = []
    tokens_after_first = 0
    decode_s = 0.0
    for i, golden in enumerate(spec.golden_prompts, 1):
        answer, ttft_s, tokens, decode = _run_prompt(llm, golden.prompt, golden.max_tokens)
        lowered = answer.lower()
        matched = next((e for e in golden.expected if e.lower() in lowered), None)
        ttft_ms = ttft_s * 1000
        if not answer:
            reasons.append(f"prompt {i}: no output")
        elif matched is None:
            reasons.append(
                f"prompt {i}: answer {answer[:80]!r} contains none of {golden.expected}"
            )
        if ttft_ms > spec.max_ttft_ms:
            reasons.append(
                f"prompt {i}: time to first token {ttft_ms:.0f} ms > {spec.max_ttft_ms:g} ms"
            )
        tokens_after_first += max(tokens - 1, 0)
        decode_s += decode
        prompts.append({"ttft_ms": round(ttft_ms, 1), "tokens": tokens, "matched": matched,
                        "answer": answer[:ANSWER_CHARS]})
    tokens_per_s = tokens_after_first / decode_s if decode_s > 0 else None
    if spec.min_tokens_per_s > 0:
        if tokens_per_s is None:
            reasons.append("too few tokens to measure decode throughput")
        elif tokens_per_s < spec.min_tokens_per_s:
            reasons.append(
                f"decode {tokens_per_s:.1f} tokens/s < {spec.min_tokens_per_s:g} tokens/s"
            )
    return {
        "passed": not reasons,
        "reasons": reasons,
        "load_ms": round(load_ms, 1),
        "ttft_ms_max": max((p["ttft_ms"] for p in prompts), default=None),
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s is not None else None,
        "prompts": prompts,
    }


def run_check(request: dict[str, Any]) -> dict[str, Any]:
    """Run the check a request describes; never raises for a bad model."""
    from protocol import HealthCheck

    spec = HealthCheck.model_validate(request["health_check"])
    if request["format"] != "gguf":
        # Fail closed: a model this agent cannot check must not take traffic.
        return _fail(f"this agent cannot health-check {request['format']} models yet")
    return check_gguf(request["model"], request["runtime"], spec)


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """End this process as soon as the agent that started it is gone.

    An orphaned check would keep running llama.cpp next to the restarted
    agent's own check, and two llama.cpp thread pools spinning on the same
    cores slow each other down a hundredfold. So: the kernel's parent-death
    signal (set here in the child: ``preexec_fn`` is unsafe in a threaded
    parent), then a check that the parent did not die before it was set,
    and a polling thread where prctl is unavailable.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(3)

    def poll() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=poll, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[--parent PID]``, request on stdin, result on stdout."""
    args = sys.argv[1:] if argv is None else argv
    # The agent passes its pid: by the time we run, it may already be gone.
    parent = int(args[1]) if args[:1] == ["--parent"] and len(args) == 2 else os.getppid()
    _die_with(parent)
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
