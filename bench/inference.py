"""Inference through the agent's local API against llama-cpp-python called directly.

Same model (SmolLM2-135M Q4_1 GGUF), same threads, same prompt, same run:
first llama-cpp-python in this process (streamed chat completion), then the
agent's runtime (a real worker subprocess) behind its real local API,
streamed over HTTP. Then swap downtime: a client sends requests back to back
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from _common import report

from agent.inference.api import ApiSettings, LocalApi
from agent.inference.runtime import InferenceRuntime
from agent.inference.spec import ModelSpec
from agent.runtime import EffectiveRuntime
from controlplane.model_cache import smollm2_path

MODEL = smollm2_path()
PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 64
ROUNDS = 5
THREADS = min(2, len(os.sched_getaffinity(0)))
SWAP_CHECK = {"golden_prompts": [{"prompt": "What is 2 + 2?", "expected": ["4", "four"],
                                  "max_tokens": 24}],
              "max_ttft_ms": 60_000.0, "min_tokens_per_s": 1.0}


def direct() -> tuple[float, float]:
    """(median tokens/s, median TTFT ms) of llama-cpp-python in this process."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=2048, n_threads=THREADS,
                          n_threads_batch=THREADS, seed=0, verbose=False)
    rates, ttfts = [], []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        stamps = []
        for chunk in llm.create_chat_completion(
                messages=[{"role": "user", "content": PROMPT}], temperature=0,
                max_tokens=MAX_TOKENS, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        ttfts.append((stamps[0] - start) * 1000)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    del llm
    return statistics.median(rates), statistics.median(ttfts)


def _spec(version: str) -> ModelSpec:
    runtime = EffectiveRuntime(threads=THREADS, gpu_layers=0, batch=None, context=2048,
                               mmap=True, embeddings=False)
    return ModelSpec(f"smollm2@{version}-micro", "smollm2", version, "gguf", MODEL, runtime)


async def through_api(client: httpx.AsyncClient) -> tuple[float, float]:
    """(median tokens/s, median TTFT ms) streamed through the local API."""
    rates, ttfts = [], []
    body = {"model": "smollm2", "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    for _ in range(ROUNDS):
        start = time.perf_counter()
        stamps = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        stamps.append(time.perf_counter())
        ttfts.append((stamps[0] - start) * 1000)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates), statistics.median(ttfts)


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
            rate, ttft = await through_api(client)
            print(f"local API: {rate:.1f} tokens/s, TTFT {ttft:.1f} ms", flush=True)
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
    return {"api_tokens_per_s": round(rate, 1), "api_ttft_ms": round(ttft, 1),
            "swap_failed_requests": sum(1 for code, _ in during if code != 200),
            "swap_requests": len(during), "steady_p99_ms": round(steady_p99 * 1000, 1),
            "swap_p99_ms": round(during_p99 * 1000, 1),
            "swap_p99_over_steady": round(during_p99 / steady_p99, 2)}


def main() -> None:
    if not MODEL.is_file():
        raise SystemExit(f"model missing at {MODEL}: run scripts/bootstrap.sh")
    print(f"model {MODEL.name}, {THREADS} threads, {MAX_TOKENS} tokens x {ROUNDS} rounds",
          flush=True)
    rate, ttft = direct()
    print(f"llama-cpp-python direct: {rate:.1f} tokens/s, TTFT {ttft:.1f} ms", flush=True)
    figures = asyncio.run(agent_side())
    report({
        "direct_tokens_per_s": round(rate, 1), "direct_ttft_ms": round(ttft, 1),
        **figures,
        "throughput_ratio": round(figures["api_tokens_per_s"] / rate, 3),
        "added_ttft_ms": round(figures["api_ttft_ms"] - ttft, 1),
    })


if __name__ == "__main__":
    main()
