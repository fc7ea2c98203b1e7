"""Inference telemetry read back: per device, and per model version and tier.

Agents send, with each heartbeat, counters per model version since the
previous heartbeat (:class:`protocol.InferenceStats`); the ingest stores the
list as JSON in ``telemetry.inference``. This module is the one place that
adds those up, for the metrics routes and for the rollout gates alike, so
an operator reads exactly the figures a gate judged.

Counters (requests, errors, tokens, crashes, OOMs) are summed. Percentiles
and tokens/s cannot be merged exactly from per-heartbeat summaries; they are
averaged weighted by each heartbeat's request count, which keeps one idle
heartbeat from counting as much as a busy one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Device, TelemetryRow

#: heartbeats one query reads at most; older ones beyond it are left out
MAX_ROWS = 200_000
_WEIGHTED = ("ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "latency_p95_ms", "tokens_per_s")
_SUMMED = ("requests", "errors", "tokens", "crashes", "ooms")


@dataclass
class Aggregate:
    """Inference figures of one model version (on one tier, or one device)."""

    model: str
    version: str
    tier: str | None
    devices: int = 0
    heartbeats: int = 0
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    crashes: int = 0
    ooms: int = 0
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    tokens_per_s: float | None = None
    _device_ids: set[str] = field(default_factory=set, repr=False)
    _sums: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def error_rate(self) -> float | None:
        """errors / requests, or None without requests."""
        return self.errors / self.requests if self.requests else None

    def add(self, device_id: str, stats: dict[str, Any]) -> None:
        """Fold one heartbeat's entry for this version in."""
        self._device_ids.add(device_id)
        self.devices = len(self._device_ids)
        self.heartbeats += 1
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + int(stats.get(name) or 0))
        weight = max(int(stats.get("requests") or 0), 1)
        for name in _WEIGHTED:
            value = stats.get(name)
            if value is None:
                continue
            total, weights = self._sums.setdefault(name, [0.0, 0.0])
            self._sums[name] = [total + float(value) * weight, weights + weight]
            setattr(self, name, self._sums[name][0] / self._sums[name][1])

    def public(self) -> dict[str, Any]:
        """The figures as plain data (for JSON)."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["error_rate"] = self.error_rate
        return out


def aggregate(
    rows: Iterable[tuple[str, str | None, Sequence[dict[str, Any]]]],
    *,
    model: str | None = None,
    by_tier: bool = True,
) -> dict[tuple[str, str, str | None], Aggregate]:
    """Fold ``(device_id, tier, inference list)`` rows into ``(model, version, tier)`` sums.

    With ``by_tier=False`` the tier key is None. Entries of other models than
    ``model`` (when given) are skipped.
    """
    out: dict[tuple[str, str, str | None], Aggregate] = {}
    for device_id, tier, entries in rows:
        for stats in entries or ():
            name, version = stats.get("model"), stats.get("version")
            if not isinstance(name, str) or not isinstance(version, str):
                continue
            if model is not None and name != model:
                continue
            key = (name, version, tier if by_tier else None)
            agg = out.get(key)
            if agg is None:
                agg = out[key] = Aggregate(name, version, key[2])
            agg.add(device_id, stats)
    return out


def telemetry_rows(
    session: Session,
    *,
    since: float | None,
    device_ids: Sequence[str] | None = None,
    tiers: Sequence[str] | None = None,
) -> list[tuple[str, str | None, list[dict[str, Any]]]]:
    """``(device_id, tier, inference list)`` of heartbeats since ``since``, newest first.

    At most :data:`MAX_ROWS`; narrowed to ``device_ids`` and ``tiers`` when given.
    """
    query = (
        select(TelemetryRow.device_id, Device.tier, TelemetryRow.inference)
        .join(Device, Device.id == TelemetryRow.device_id)
        .order_by(TelemetryRow.ts.desc())
        .limit(MAX_ROWS)
    )
    if since is not None:
        query = query.where(TelemetryRow.ts >= since)
    if device_ids is not None:
        query = query.where(TelemetryRow.device_id.in_(device_ids))
    if tiers is not None:
        query = query.where(Device.tier.in_(tiers))
    return [(d, t, inf) for d, t, inf in session.execute(query).all()]


def device_metrics(session: Session, device_id: str, *, since: float | None) -> list[Aggregate]:
    """One device's figures per model version since ``since``, by model and version."""
    sums = aggregate(telemetry_rows(session, since=since, device_ids=[device_id]), by_tier=False)
    return [sums[k] for k in sorted(sums)]


def model_metrics(
    session: Session,
    model: str,
    *,
    since: float | None,
    device_ids: Sequence[str] | None = None,
) -> dict[tuple[str, str | None], Aggregate]:
    """Every version of ``model``: ``(version, tier) -> figures`` since ``since``."""
    sums = aggregate(telemetry_rows(session, since=since, device_ids=device_ids), model=model)
    return {(version, tier): agg for (_, version, tier), agg in sums.items()}


def version_metrics(
    session: Session, model: str, version: str, *, since: float | None
) -> list[Aggregate]:
    """``model@version``'s figures per tier since ``since``, by tier."""
    found = model_metrics(session, model, since=since)
    return [agg for (v, _), agg in sorted(found.items(), key=lambda kv: str(kv[0][1]))
            if v == version]
