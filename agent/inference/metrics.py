"""``/metrics``: Prometheus text exposition, per model version.

Rendered by hand: the format is a few lines per series, and the
``prometheus_client`` registry would cost the agent resident memory it
does not have to spare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .stats import BUCKETS_S, Histogram, VersionStats

PREFIX = "slmfleet_inference"
#: loading and unloading models (several per device, a cap on those loaded)
MODEL_PREFIX = "slmfleet_model"


def _labels(stats: VersionStats, **extra: str) -> str:
    pairs = {"model": stats.name, "version": stats.version, **extra}
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram(lines: list[str], name: str, stats: VersionStats, hist: Histogram) -> None:
    for bound, count in zip(BUCKETS_S, hist.counts, strict=True):
        lines.append(f"{name}_bucket{_labels(stats, le=f'{bound:g}')} {count}")
    lines.append(f"{name}_bucket{_labels(stats, le='+Inf')} {hist.total}")
    lines.append(f"{name}_sum{_labels(stats)} {hist.sum_s:.6f}")
    lines.append(f"{name}_count{_labels(stats)} {hist.total}")


def render(versions: list[VersionStats], queue_depth: dict[str, int],
           loaded: set[str] | None = None) -> str:
    """The exposition text; ``queue_depth`` by ``name@version``, ``loaded`` the
    ``name@version`` of every version whose worker runs now."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, prefix: str = PREFIX) -> str:
        full = f"{prefix}_{name}"
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} {kind}")
        return full

    name = family("requests_total", "counter", "Requests answered, by outcome.")
    for s in versions:
        out.append(f"{name}{_labels(s, outcome='ok')} {s.requests_ok}")
        out.append(f"{name}{_labels(s, outcome='error')} {s.requests_error}")
        out.append(f"{name}{_labels(s, outcome='rejected')} {s.rejected}")
    def each(name: str, kind: str, help_text: str, value: Callable[[VersionStats], Any],
             prefix: str = PREFIX) -> None:
        """A family with one sample per version; a version whose value is None has none."""
        full = family(name, kind, help_text, prefix)
        for s in versions:
            if (sample := value(s)) is not None:
                out.append(f"{full}{_labels(s)} {sample}")

    each("errors_total", "counter", "Requests that failed or were turned away.",
         lambda s: s.requests_error + s.rejected)
    name = family("tokens_total", "counter", "Tokens read (prompt) and generated (completion).")
    for s in versions:
        out.append(f"{name}{_labels(s, kind='prompt')} {s.prompt_tokens}")
        out.append(f"{name}{_labels(s, kind='completion')} {s.completion_tokens}")
    name = family("ttft_seconds", "histogram", "Time to first token, queueing included.")
    for s in versions:
        _histogram(out, name, s, s.ttft)
    name = family("latency_seconds", "histogram", "Request latency, queueing included.")
    for s in versions:
        _histogram(out, name, s, s.latency)
    each("tokens_per_second", "gauge", "Decode throughput of the latest request.",
         lambda s: None if s.last_tokens_per_s is None else f"{s.last_tokens_per_s:.3f}")
    each("slots", "gauge", "Requests the version's worker runs at once.", lambda s: s.slots)
    each("slots_busy", "gauge", "Requests running on the version's worker now.",
         lambda s: s.busy)
    each("queue_depth", "gauge", "Requests waiting for a free slot.",
         lambda s: queue_depth.get(f"{s.name}@{s.version}", 0))
    each("worker_restarts_total", "counter", "Worker restarts after a crash.",
         lambda s: s.crashes)
    each("worker_ooms_total", "counter", "Worker deaths by the OOM killer.", lambda s: s.ooms)
    each("loads_total", "counter", "Worker starts that loaded the model (first load, reload "
         "after an unload, restart after a crash).", lambda s: s.loads, MODEL_PREFIX)
    each("load_seconds_total", "counter", "Time spent starting workers and loading the model.",
         lambda s: f"{s.load_s:.6f}", MODEL_PREFIX)
    name = family("unloads_total", "counter", "Loaded workers stopped on purpose, by reason "
                  "(lru, memory, keep_alive, replaced, removed).", MODEL_PREFIX)
    for s in versions:
        for reason, count in sorted(s.unloads.items()):
            out.append(f"{name}{_labels(s, reason=reason)} {count}")
    refs = loaded or set()
    each("loaded", "gauge", "1 while a worker of the version runs.",
         lambda s: int(f"{s.name}@{s.version}" in refs), MODEL_PREFIX)
    return "\n".join(out) + "\n"
