"""Inference through the agent's local API against llama-cpp-python called directly.

Same model (SmolLM2-135M Q4_1 GGUF), same threads, same prompt, same run:
llama-cpp-python in this process (streamed chat completion) and the agent's
runtime (a real worker subprocess) behind its real local API, streamed over
HTTP, round for round in turn. Then swap downtime: a client sends requests back to back
while the runtime swaps to a new version (load + health check in a second
worker, then the switch), against the same client's steady state.

Then concurrency and the peer (peer.py): the agent with ``BENCH_SLOTS``
slots against llama.cpp's own server (llama-server, built once and cached
by scripts/build-llama-server.sh) with as many, 1 and 4 callers, a short
request behind a long one, JSON grammar against free text; and the memory a
second slot adds (slot_memory.py). The last lines are a summary table to
paste into docs/benchmarks.md, then the figures as one JSON object.

Targets: throughput ratio >= 0.95, added TTFT <= 10 ms, zero failed
requests during the swap, p99 latency during the swap <= 2x steady state;
4 callers >= 1.2x the tokens/s of 1; a short request's p95 TTFT behind a
long one <= 3x alone; JSON >= 0.8x free text's tokens/s; a second slot
adds its KV cache plus <= 20 MB; against llama-server >= 1.0x with 1
caller, >= 0.95x with 4, TTFT within 10 ms. ``BENCH_PARTS`` picks parts
(default ``api,peer,memory``: the first part, peer.py, slot_memory.py).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import llama_server
from _agent import MODEL, THREADS, serving, spec
from _common import report
from concurrency import chat_body, stream_chat
from peer import peer_figures
from slot_memory import slot_memory
from summary import summary_table

PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 64
ROUNDS = 15
#: tokens per answer in the concurrency, peer and memory figures
PEER_TOKENS = 128
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


async def api_round(client: httpx.AsyncClient) -> tuple[float, float]:
    """The same completion streamed through the local API."""
    streamed = await stream_chat(client, chat_body(PROMPT, MAX_TOKENS))
    return streamed.decode_rate, streamed.ttft_ms


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
    """Direct against the API, then the swap, with the agent's default settings."""
    async with serving(spec("1.0.0")) as (runtime, url), \
            httpx.AsyncClient(base_url=url, timeout=120) as client:
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
        result = await runtime.prepare(spec("1.1.0"), SWAP_CHECK, asyncio.Event(), 300)
        assert result["passed"], result
        runtime.activated(spec("1.1.0"))
        await asyncio.sleep(2)  # traffic on the new version, the old one stopping
        swap_s = time.perf_counter() - started
        stop.set()
        during = await swap_task
        print(f"swap: {len(during)} requests over {swap_s:.1f} s", flush=True)
    steady_p99 = p99([s for _, s in steady])
    during_p99 = p99([s for _, s in during])
    return {**compared,
            "swap_failed_requests": sum(1 for code, _ in during if code != 200),
            "swap_requests": len(during), "steady_p99_ms": round(steady_p99 * 1000, 1),
            "swap_p99_ms": round(during_p99 * 1000, 1),
            "swap_p99_over_steady": round(during_p99 / steady_p99, 2)}


async def run_all(parts: set[str], binary: Path | None) -> dict[str, float | int | str]:
    """The figures of ``parts``, one part after the other so that no two measure at once."""
    figures: dict[str, float | int | str] = {}
    if "api" in parts:
        figures |= await agent_side()
    if binary is not None and "peer" in parts:
        figures |= await peer_figures(PEER_TOKENS, binary)
    if binary is not None and "memory" in parts:
        figures |= await slot_memory(PEER_TOKENS, binary)
    return figures


def main() -> None:
    if not MODEL.is_file():
        raise SystemExit(f"model missing at {MODEL}: run scripts/bootstrap.sh")
    parts = set(os.environ.get("BENCH_PARTS", "api,peer,memory").split(","))
    if not parts <= {"api", "peer", "memory"}:
        raise SystemExit(f"BENCH_PARTS: {sorted(parts)}; known: api, peer, memory")
    # Built (or found) before anything is measured: a first build takes minutes.
    binary = llama_server.llama_server_binary() if parts & {"peer", "memory"} else None
    print(f"model {MODEL.name}, {THREADS} threads, {MAX_TOKENS} tokens x {ROUNDS} rounds, "
          f"then {PEER_TOKENS} tokens; load {os.getloadavg()[0]:.2f}", flush=True)
    figures = asyncio.run(run_all(parts, binary))
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(summary_table(figures), flush=True)
    report(figures)


if __name__ == "__main__":
    main()
