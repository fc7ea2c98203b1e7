"""The agent with several slots against llama.cpp's own server, in one run.

Both serve the same GGUF with the same threads, batch, context per slot and
number of slots (``BENCH_SLOTS``, default 4; llama-server ``-np`` slots and
``-c`` slots x context), greedy, 128 tokens; the same client code
(concurrency.py) measures both, round for round in turn:

- 1 caller and 4 concurrent callers: aggregate tokens/s (all tokens over
  the wall time from the first request sent to the last token) and TTFT;
- a short request sent while a long answer streams against the same short
  request alone: p95 TTFT;
- the same request with a JSON grammar (``response_format`` ``json_object``)
  and without: decoding tokens/s.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import httpx
import llama_server
from _agent import CONTEXT, MODEL, THREADS, serving, spec
from concurrency import (
    JSON_PROMPT,
    Aggregate,
    Streamed,
    alternate,
    chat_body,
    concurrent,
    p95,
    short_ttft,
    stream_chat,
)

SLOTS = int(os.environ.get("BENCH_SLOTS", 4))
CALLERS = 4
ROUNDS = int(os.environ.get("BENCH_PEER_ROUNDS", 5))
#: short-behind-long samples per server
SAMPLES = int(os.environ.get("BENCH_SAMPLES", 12))
JSON_FORMAT = {"response_format": {"type": "json_object"}}
#: a connection per request, for both servers alike: llama-server closes a kept-alive
#: connection between requests at times, and a request sent on it fails unsent
FRESH = httpx.Limits(max_keepalive_connections=0)


async def _callers(targets: dict[str, httpx.AsyncClient], callers: int,
                   max_tokens: int) -> dict[str, tuple[float, float]]:
    """Median (aggregate tokens/s, TTFT ms) of ``callers`` concurrent callers, per target."""
    async def measure(client: httpx.AsyncClient) -> Aggregate:
        return await concurrent(client, callers, max_tokens)

    # Single callers are quick and noisier: twice the rounds.
    rounds = ROUNDS * (2 if callers == 1 else 1)
    runs = await alternate(targets, rounds, measure)
    return {name: (statistics.median(a.tokens_per_s for a in r),
                   statistics.median(a.ttft_ms for a in r)) for name, r in runs.items()}


async def _short_behind_long(targets: dict[str, httpx.AsyncClient],
                             max_tokens: int) -> dict[str, tuple[float, float]]:
    """p95 TTFT (ms) of the short request (alone, behind a long answer), per target."""
    async def measure(client: httpx.AsyncClient) -> tuple[float, float]:
        return (await short_ttft(client, False, max_tokens),
                await short_ttft(client, True, max_tokens))

    runs = await alternate(targets, SAMPLES, measure)
    return {name: (p95([a for a, _ in r]), p95([b for _, b in r])) for name, r in runs.items()}


async def _json_cost(targets: dict[str, httpx.AsyncClient],
                     max_tokens: int) -> dict[str, tuple[float, float, int]]:
    """Median decoding tokens/s (free text, JSON) and the JSON answers' tokens, per target."""
    async def measure(client: httpx.AsyncClient) -> tuple[Streamed, Streamed]:
        return (await stream_chat(client, chat_body(JSON_PROMPT, max_tokens)),
                await stream_chat(client, chat_body(JSON_PROMPT, max_tokens, **JSON_FORMAT)))

    runs = await alternate(targets, ROUNDS, measure)
    return {name: (statistics.median(f.decode_rate for f, _ in r),
                   statistics.median(j.decode_rate for _, j in r),
                   min(j.tokens for _, j in r)) for name, r in runs.items()}


async def peer_figures(max_tokens: int, binary: Path) -> dict[str, float | int]:
    """Every figure of the module docstring, for the agent and llama-server."""
    settings = llama_server.ServerSettings(MODEL, THREADS, slots=SLOTS, context=CONTEXT)
    with llama_server.running(settings, binary) as server:
        async with serving(spec("1.0.0", SLOTS)) as (_, agent_url), \
                httpx.AsyncClient(base_url=agent_url, timeout=300, limits=FRESH) as agent, \
                httpx.AsyncClient(base_url=server.url, timeout=300, limits=FRESH) as peer:
            targets = {"agent": agent, "llama_server": peer}
            one = await _callers(targets, 1, max_tokens)
            print(f"1 caller: {one}", flush=True)
            many = await _callers(targets, CALLERS, max_tokens)
            print(f"{CALLERS} callers: {many}", flush=True)
            short = await _short_behind_long(targets, max_tokens)
            print(f"short TTFT p95 alone/behind a long answer: {short}", flush=True)
            json_cost = await _json_cost(targets, max_tokens)
            print(f"free text/JSON tokens/s: {json_cost}", flush=True)
    figures: dict[str, float | int] = {"slots": SLOTS}
    for name in targets:
        figures |= {
            f"{name}_1_caller_tokens_per_s": one[name][0],
            f"{name}_1_caller_ttft_ms": one[name][1],
            f"{name}_{CALLERS}_callers_tokens_per_s": many[name][0],
            f"{name}_{CALLERS}_callers_ttft_ms": many[name][1],
            f"{name}_{CALLERS}_over_1": many[name][0] / one[name][0],
            f"{name}_short_ttft_alone_p95_ms": short[name][0],
            f"{name}_short_ttft_behind_long_p95_ms": short[name][1],
            f"{name}_short_ttft_ratio": short[name][1] / short[name][0],
            f"{name}_free_tokens_per_s": json_cost[name][0],
            f"{name}_json_tokens_per_s": json_cost[name][1],
            f"{name}_json_min_tokens": json_cost[name][2],
            f"{name}_json_over_free": json_cost[name][1] / json_cost[name][0],
        }
    figures |= {
        "agent_over_llama_server_1_caller": one["agent"][0] / one["llama_server"][0],
        f"agent_over_llama_server_{CALLERS}_callers": many["agent"][0] / many["llama_server"][0],
        "agent_minus_llama_server_ttft_ms": one["agent"][1] - one["llama_server"][1],
    }
    return {k: round(v, 3 if isinstance(v, float) and abs(v) < 10 else 1)
            if isinstance(v, float) else v for k, v in figures.items()}
