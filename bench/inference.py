"""Inference through the agent's local API against llama-cpp-python called directly.

Same model (SmolLM2-135M Q4_1 GGUF), same threads, same prompt, same run:
llama-cpp-python in this process (streamed chat completion) and the agent's
runtime (a real worker subprocess) behind its real local API, streamed over
HTTP, round for round in turn. Then swap downtime: a client sends requests back to back
while the runtime swaps to a new version (load + health check in a second
worker, then the switch), against the same client's steady state.

Targets: throughput ratio >= 0.95, added TTFT <= 10 ms, zero failed
requests during the swap, p99 latency during the swap <= 2x steady state.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from _common import report

from agent.inference.api import ApiSettings, LocalApi
from agent.inference.runtime import InferenceRuntime
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from controlplane.devfleet.model_cache import smollm2_path

MODEL = smollm2_path()
PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 64
ROUNDS = 15
THREADS = int(os.environ.get("BENCH_THREADS", min(2, len(os.sched_getaffinity(0)))))
SWAP_CHECK = {"golden_prompts": [{"prompt": "What is 2 + 2?", "expected": ["4", "four"],
                                  "max_tokens": 24}],
              "max_ttft_ms": 60_000.0, "min_tokens_per_s": 1.0}


def _rate_and_ttft(start: float, stamps: list[float]) -> tuple[float, float]:
    """(tokens/s after the first, TTFT ms) of one streamed completion."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), (stamps[0] - start) * 1000


def direct_round(llm: Any) -> tuple[float, float]:
    """One streamed chat completion of llama-cpp-python in this process."""
    start = time.perf_counter()
    stamps = []
    for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}], temperature=0,
            max_tokens=MAX_TOKENS, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return _rate_and_ttft(start, stamps)


def _spec(version: str) -> ModelSpec:
    runtime = EffectiveRuntime(threads=THREADS, gpu_layers=0, batch=None, context=2048,
                               mmap=True, embeddings=False)
    return ModelSpec(f"smollm2@{version}-micro", "smollm2", version, "gguf", MODEL, runtime)


async def api_round(client: httpx.AsyncClient) -> tuple[float, float]:
    """The same completion streamed through the local API."""
    body = {"model": "smollm2", "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    start = time.perf_counter()
    stamps = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    # A chunk may carry several tokens: count them from the closing usage.
    return (tokens - 1) / (stamps[-1] - stamps[0]), (stamps[0] - start) * 1000


async def compare(client: httpx.AsyncClient) -> dict[str, float]:
    """Medians of direct and API rounds, alternated so drift on a shared machine
    (other tenants, CPU frequency) falls on both alike."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=2048, n_threads=THREADS,
                          n_threads_batch=THREADS, seed=0, verbose=False)
    # One round each first, not counted: the first run of a fresh context is slower.
    direct_round(llm)
    await api_round(client)
    direct, api = [], []
    for _ in range(ROUNDS):
        direct.append(direct_round(llm))
        api.append(await api_round(client))
    del llm
    figures = {
        "direct_tokens_per_s": statistics.median(r for r, _ in direct),
        "direct_ttft_ms": statistics.median(t for _, t in direct),
        "api_tokens_per_s": statistics.median(r for r, _ in api),
        "api_ttft_ms": statistics.median(t for _, t in api),
    }
    print(f"llama-cpp-python direct: {figures['direct_tokens_per_s']:.1f} tokens/s, "
          f"TTFT {figures['direct_ttft_ms']:.1f} ms", flush=True)
    print(f"local API: {figures['api_tokens_per_s']:.1f} tokens/s, "
          f"TTFT {figures['api_ttft_ms']:.1f} ms", flush=True)
    return {**{k: round(v, 1) for k, v in figures.items()},
            "throughput_ratio": round(figures["api_tokens_per_s"]
                                      / figures["direct_tokens_per_s"], 3),
            "added_ttft_ms": round(figures["api_ttft_ms"] - figures["direct_ttft_ms"], 1)}


async def latencies(client: httpx.AsyncClient, stop: asyncio.Event,
                    max_requests: int = 500) -> list[tuple[int, float]]:
    """Back-to-back short requests until ``stop`` (bounded): (status, seconds)."""
    out = []
    body = {"model": "smollm2", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}
    for _ in range(max_requests):
        if stop.is_set():
            break
        start = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body)
        out.append((r.status_code, time.perf_counter() - start))
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def agent_side() -> dict[str, float]:
    runtime = InferenceRuntime()
    api = LocalApi(runtime, ApiSettings())
    await runtime.serve(_spec("1.0.0"))
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}",
                                     timeout=120) as client:
            compared = await compare(client)
            stop = asyncio.Event()
            steady_task = asyncio.create_task(latencies(client, stop))
            await asyncio.sleep(8)
            stop.set()
            steady = await steady_task
            print(f"steady: {len(steady)} requests", flush=True)
            stop = asyncio.Event()
            swap_task = asyncio.create_task(latencies(client, stop))
            started = time.perf_counter()
            result = await runtime.prepare(_spec("1.1.0"), SWAP_CHECK, asyncio.Event(), 300)
            assert result["passed"], result
            runtime.activated(_spec("1.1.0"))
            await asyncio.sleep(2)  # traffic on the new version, the old one stopping
            swap_s = time.perf_counter() - started
            stop.set()
            during = await swap_task
            print(f"swap: {len(during)} requests over {swap_s:.1f} s", flush=True)
    finally:
        await api.close()
        await runtime.close()
    steady_p99 = p99([s for _, s in steady])
    during_p99 = p99([s for _, s in during])
    return {**compared,
            "swap_failed_requests": sum(1 for code, _ in during if code != 200),
            "swap_requests": len(during), "steady_p99_ms": round(steady_p99 * 1000, 1),
            "swap_p99_ms": round(during_p99 * 1000, 1),
            "swap_p99_over_steady": round(during_p99 / steady_p99, 2)}


def main() -> None:
    if not MODEL.is_file():
        raise SystemExit(f"model missing at {MODEL}: run scripts/bootstrap.sh")
    print(f"model {MODEL.name}, {THREADS} threads, {MAX_TOKENS} tokens x {ROUNDS} rounds",
          flush=True)
    report(asyncio.run(agent_side()))


if __name__ == "__main__":
    main()
