"""Inference counters per model version: a window per heartbeat, totals for /metrics."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocol import InferenceStats

#: samples kept per heartbeat window for the percentiles (a busy device keeps the latest)
WINDOW_SAMPLES = 4096
#: histogram bucket bounds, seconds (TTFT and latency)
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(slots=True)
class Histogram:
    """Cumulative Prometheus histogram over :data:`BUCKETS_S`."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_S))
    total: int = 0
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.total += 1
        self.sum_s += seconds
        for i, bound in enumerate(BUCKETS_S):
            if seconds <= bound:
                self.counts[i] += 1


@dataclass(slots=True)
class _Window:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    crashes: int = 0
    ooms: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    loads: int = 0
    load_s: float = 0.0
    ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))


class VersionStats:
    """Everything counted for one ``name@version``."""

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self._window = _Window()
        self.requests_ok = 0
        self.requests_error = 0
        self.rejected = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.latency = Histogram()
        self.crashes = 0
        self.ooms = 0
        self.restarts = 0
        self.last_tokens_per_s: float | None = None
        #: requests its worker runs at once (0: never loaded), and how many run now
        self.slots = 0
        self.busy = 0
        #: worker starts (first load, reload after an unload, restart after a crash)
        self.loads = 0
        self.load_s = 0.0
        #: workers stopped while loaded, by why (``lru``, ``memory``, ``keep_alive``,
        #: ``replaced``, ``removed``)
        self.unloads: dict[str, int] = {}

    def record(self, *, ok: bool, latency_s: float, ttft_s: float | None = None,
               prompt_tokens: int = 0, completion_tokens: int = 0,
               decode_s: float = 0.0) -> None:
        """Count one finished request (as the caller saw it: queueing included)."""
        w = self._window
        w.requests += 1
        w.tokens += prompt_tokens + completion_tokens
        w.latency_ms.append(latency_s * 1000)
        self.latency.observe(latency_s)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if not ok:
            w.errors += 1
            self.requests_error += 1
            return
        self.requests_ok += 1
        if ttft_s is not None:
            w.ttft_ms.append(ttft_s * 1000)
            self.ttft.observe(ttft_s)
        if completion_tokens > 1 and decode_s > 0:
            w.decode_tokens += completion_tokens - 1
            w.decode_s += decode_s
            self.last_tokens_per_s = (completion_tokens - 1) / decode_s

    def reject(self) -> None:
        """A request turned away before it ran (queue full); an error to the caller."""
        self.rejected += 1
        self._window.requests += 1
        self._window.errors += 1

    def crash(self, oom: bool) -> None:
        """The worker died under this version."""
        self.crashes += 1
        self._window.crashes += 1
        if oom:
            self.ooms += 1
            self._window.ooms += 1

    def loaded(self, seconds: float) -> None:
        """A worker of this version started and loaded the model in ``seconds``."""
        self.loads += 1
        self.load_s += seconds
        self._window.loads += 1
        self._window.load_s += seconds

    def unloaded(self, reason: str) -> None:
        """A loaded worker of this version was stopped on purpose, for ``reason``."""
        self.unloads[reason] = self.unloads.get(reason, 0) + 1

    def active(self) -> bool:
        """Anything counted since the last heartbeat."""
        w = self._window
        return bool(w.requests or w.crashes or w.loads)

    def take(self) -> InferenceStats:
        """The window since the last call, for one heartbeat; starts a new window."""
        w, self._window = self._window, _Window()

        def rounded(value: float | None) -> float | None:
            return round(value, 2) if value is not None else None

        ttft, latency = list(w.ttft_ms), list(w.latency_ms)
        loads: dict[str, int | float] = {}
        if "loads" in InferenceStats.model_fields:
            # Older wire models have no load counters: the rest still goes out.
            loads = {"loads": w.loads, "load_ms": round(w.load_s * 1000, 2)}
        return InferenceStats(
            model=self.name[:128], version=self.version[:128],
            requests=w.requests, errors=w.errors, tokens=w.tokens,
            ttft_p50_ms=rounded(percentile(ttft, 50)), ttft_p95_ms=rounded(percentile(ttft, 95)),
            latency_p50_ms=rounded(percentile(latency, 50)),
            latency_p95_ms=rounded(percentile(latency, 95)),
            tokens_per_s=rounded(w.decode_tokens / w.decode_s) if w.decode_s > 0 else None,
            crashes=w.crashes, ooms=w.ooms, **loads,
        )
