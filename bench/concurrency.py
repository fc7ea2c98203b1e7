"""Streamed chat completions from concurrent callers, measured the same way for any server.

One client (httpx, OpenAI-compatible ``/v1/chat/completions``, streamed)
for the agent's local API and llama-server alike, so that a difference
between them is the server's. Every figure is taken from token arrival
times seen by the caller on 127.0.0.1; callers are bounded in count and
each request in tokens and time.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

#: the prompt of every decoding figure: long answers, so 128 tokens are rarely cut by an end
STORY = "Write a long story about a robot who learns to paint."
#: the short request queued behind a long one
SHORT = "Say hello."
#: the structured-output figure: the same request with and without a JSON grammar
JSON_PROMPT = "Describe three animals, their habitat and their food, as JSON."


@dataclass(frozen=True, slots=True)
class Streamed:
    """Arrival times (perf_counter seconds) of one streamed completion."""

    sent: float
    first: float
    last: float
    #: completion tokens, from the closing ``usage`` (a chunk may carry several)
    tokens: int

    @property
    def ttft_ms(self) -> float:
        """Time to the first content token."""
        return (self.first - self.sent) * 1000

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first: the decoding speed one caller sees."""
        return (self.tokens - 1) / (self.last - self.first)


def chat_body(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A greedy streamed chat request; llama-server ignores ``model``, the agent needs it."""
    return {"model": "smollm2", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}], **extra}


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any],
                      first_token: asyncio.Event | None = None) -> Streamed:
    """Send ``body`` and time its tokens; ``first_token`` is set when the first arrives."""
    sent = time.perf_counter()
    first = last = 0.0
    chunks = tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            # llama-server sends its usage in a chunk of its own, with no choices
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                if not chunks:
                    first = last
                    if first_token is not None:
                        first_token.set()
                chunks += 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if not chunks:
        raise RuntimeError(f"{r.url}: no content streamed")
    return Streamed(sent, first, last, tokens or chunks)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """``callers`` concurrent completions, from the first request sent to the last token."""

    callers: int
    tokens: int
    seconds: float
    ttft_ms: float

    @property
    def tokens_per_s(self) -> float:
        """All callers' tokens over the wall time: the server's throughput."""
        return self.tokens / self.seconds


async def concurrent(client: httpx.AsyncClient, callers: int, max_tokens: int) -> Aggregate:
    """``callers`` story requests at once (each its own prompt, the same set for every server)."""
    bodies = [chat_body(f"{STORY} Call it part {i + 1}.", max_tokens) for i in range(callers)]
    done = await asyncio.gather(*(stream_chat(client, b) for b in bodies))
    return Aggregate(callers, sum(s.tokens for s in done),
                     max(s.last for s in done) - min(s.sent for s in done),
                     statistics.median(s.ttft_ms for s in done))


async def short_ttft(client: httpx.AsyncClient, behind_long: bool, long_tokens: int,
                     head_start_s: float = 0.2) -> float:
    """TTFT (ms) of a short request, alone or sent while a long answer is being decoded.

    The short one goes ``head_start_s`` after the long one's first token, so it
    arrives mid-answer, never as the long one's prompt is still read.
    """
    short = chat_body(SHORT, 8)
    if not behind_long:
        return (await stream_chat(client, short)).ttft_ms
    started = asyncio.Event()
    long_task = asyncio.create_task(stream_chat(client, chat_body(STORY, long_tokens), started))
    try:
        waiting = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiting, long_task}, timeout=60,
                           return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if long_task.done():
            long_task.result()  # it failed before its first token: say why
        if not started.is_set():
            raise TimeoutError("the long answer's first token took over 60 s")
        await asyncio.sleep(head_start_s)
        ttft = (await stream_chat(client, short)).ttft_ms
        await long_task
    finally:
        long_task.cancel()
    return ttft


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (of fewer than 20 values: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


async def alternate(targets: dict[str, httpx.AsyncClient], rounds: int,
                    measure: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> dict[str, list]:
    """``measure`` each target in turn, ``rounds`` times after one uncounted round each,
    so drift of a shared machine (other tenants, CPU frequency) falls on all alike."""
    for client in targets.values():
        await measure(client)
    out: dict[str, list] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, client in targets.items():
            out[name].append(await measure(client))
    return out
