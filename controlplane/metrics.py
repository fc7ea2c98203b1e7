"""Prometheus metrics, read at scrape time from the ingest and the database."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from .context import AppContext
from .db.queries import count_devices_by_tier_and_state

log = logging.getLogger(__name__)


class ControlPlaneCollector(Collector):
    """Ingest counters and devices by tier and online state.

    A custom collector rather than Counter objects updated on the hot path:
    the ingest already counts under its own lock, and this reads once per scrape.
    """

    def __init__(self, context: AppContext) -> None:
        self._context = context

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (called by the registry on each scrape)."""
        stats = self._context.ingest.stats()
        for name, doc, value in (
            ("received", "MQTT messages received", stats.received),
            ("accepted", "messages that passed validation", stats.accepted),
            ("written", "messages committed to the database", stats.written),
            ("dropped", "accepted messages abandoned at shutdown", stats.dropped),
            ("batches", "database batches committed", stats.batches),
            ("write_errors", "failed batch write attempts", stats.write_errors),
        ):
            yield CounterMetricFamily(f"slmfleet_ingest_{name}", doc, value=value)
        rejected = CounterMetricFamily(
            "slmfleet_ingest_rejected", "messages refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "slmfleet_ingest_queue_depth",
            "messages waiting for the writer",
            value=stats.queue_depth,
        )
        yield GaugeMetricFamily(
            "slmfleet_mqtt_connected", "1 when subscribed to the broker", value=int(stats.connected)
        )
        if stats.last_batch_ms is not None:
            yield GaugeMetricFamily(
                "slmfleet_ingest_last_batch_seconds",
                "duration of the last committed batch",
                value=stats.last_batch_ms / 1000.0,
            )
        yield from self._device_metrics()

    def _device_metrics(self) -> Iterator[Metric]:
        try:
            with self._context.sessions() as session:
                counts = count_devices_by_tier_and_state(session)
        except SQLAlchemyError as exc:
            # The scrape still reports the ingest; health says the database is down.
            log.warning("metrics: cannot count devices: %s", exc)
            return
        devices = GaugeMetricFamily(
            "slmfleet_devices", "devices by tier and online state", labels=["tier", "online"]
        )
        for tier, online, count in counts:
            devices.add_metric([tier or "unknown", "true" if online else "false"], count)
        yield devices


def build_registry(context: AppContext) -> CollectorRegistry:
    """A fresh registry holding the control plane's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlPlaneCollector(context))
    return registry
