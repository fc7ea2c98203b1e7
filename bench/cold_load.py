"""Cold load: the first-token time of a request to a model that is not loaded,
against the same request to a loaded one.

Two models on one runtime behind its real local API, with a loaded-model cap
of one: the SmolLM2-135M GGUF served under two names, so a request to the
one not loaded unloads the other (least recently used, idle) and loads its
own worker first. Each round asks the unloaded model (cold), then asks it
again (warm); the rounds alternate between the two names. Medians of
``ROUNDS`` rounds, with the part of the cold request spent loading as the
runtime counted it (what ``slmfleet_model_load_seconds_total`` adds up).
The last line is the figures as one JSON object.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from _agent import MODEL, THREADS, spec
from _common import report
from concurrency import chat_body, stream_chat

from agent.inference.api import ApiSettings, LocalApi
from agent.inference.runtime import InferenceRuntime, RuntimeLimits

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PROMPT = "Write one sentence about the sea."
NAMES = ("smollm2", "smollm2-twin")


async def ttft_ms(client: httpx.AsyncClient, name: str) -> float:
    """First-token time of one short streamed chat request to ``name``."""
    streamed = await stream_chat(client, chat_body(PROMPT, 8, model=name))
    return streamed.ttft_ms


async def measure() -> dict[str, float | int]:
    """The cold and warm first-token times, and the load time the runtime counted."""
    first = spec("1.0.0")
    twin = replace(first, key="smollm2-twin@1.0.0-micro", name=NAMES[1])
    runtime = InferenceRuntime(RuntimeLimits(max_loaded=1))
    api = LocalApi(runtime, ApiSettings())
    cold, warm, loading = [], [], []
    try:
        await runtime.serve(first)
        await runtime.serve(twin)  # past the cap: loads on its first request
        await api.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}",
                                     timeout=300) as client:
            await ttft_ms(client, NAMES[0])  # a first request, not counted
            for i in range(ROUNDS):
                name = NAMES[(i + 1) % 2]  # the one not loaded
                assert not runtime.hosts[name].loaded
                stats = runtime.hosts[name].serving.stats
                before = stats.load_s
                cold.append(await ttft_ms(client, name))
                loading.append((stats.load_s - before) * 1000)
                warm.append(await ttft_ms(client, name))
                print(f"round {i + 1}: {name} cold {cold[-1]:.0f} ms (loading "
                      f"{loading[-1]:.0f} ms), warm {warm[-1]:.0f} ms", flush=True)
        loads = sum(s.loads for s in runtime.all_stats())
    finally:
        await api.close()
        await runtime.close()
    return {"cold_ttft_ms": round(statistics.median(cold), 1),
            "warm_ttft_ms": round(statistics.median(warm), 1),
            "cold_over_warm": round(statistics.median(cold) / statistics.median(warm), 1),
            "cold_load_ms": round(statistics.median(loading), 1), "loads": loads,
            "rounds": ROUNDS}


def main() -> None:
    if not MODEL.is_file():
        raise SystemExit(f"model missing at {MODEL}: run scripts/bootstrap.sh")
    print(f"model {MODEL.name}, {THREADS} threads, cap 1 of 2 models, {ROUNDS} rounds; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    figures: dict[str, float | int | str] = dict(asyncio.run(measure()))
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    report(figures)


if __name__ == "__main__":
    main()
