"""Prometheus metrics, read at scrape time from the ingest and the database."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from controlplane.rollouts.eval_scores import recent_eval_scores

from .context import AppContext
from .db.models import Rollout, RolloutDevice
from .db.queries import count_devices_by_form, count_devices_by_tier_and_state
from .db.statuses import MOVING_ROLLOUT_STATES

log = logging.getLogger(__name__)

_VERDICT = {"pass": 1, "wait": 0, "fail": -1}


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
        yield from self._rollout_metrics()
        yield from self._eval_metrics()

    def _eval_metrics(self) -> Iterator[Metric]:
        """Mean on-device evaluation score per version and tier of the newest rollouts."""
        try:
            with self._context.engine.connect() as conn:
                rows = recent_eval_scores(conn)
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read evaluation scores: %s", exc)
            return
        score = GaugeMetricFamily(
            "slmfleet_eval_score",
            "mean on-device evaluation score (0..1) of a version in a tier, over the devices "
            "of a rollout that scored it (role: new = the rollout's version, old = the one "
            "it replaces)",
            labels=["rollout", "model", "version", "tier", "role"],
        )
        for rollout_id, model, row in rows:
            score.add_metric([rollout_id, model, row["version"], row["tier"], row["role"]],
                             row["score"])
        yield score

    def _rollout_metrics(self) -> Iterator[Metric]:
        """Stage, device states and the latest gate evaluation of each rollout in progress.

        Only rollouts still moving (not completed, aborted, rolled back or
        superseded) are exported, which keeps the label sets few.
        """
        try:
            with self._context.engine.connect() as conn:
                live = conn.execute(
                    select(Rollout.id, Rollout.model_name, Rollout.version, Rollout.state,
                           Rollout.stage_index, Rollout.last_gates)
                    .where(Rollout.state.in_(MOVING_ROLLOUT_STATES))
                ).all()
                counts = conn.execute(
                    select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
                    .where(RolloutDevice.rollout_id.in_([r.id for r in live]))
                    .group_by(RolloutDevice.rollout_id, RolloutDevice.state)
                ).all() if live else []
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read rollouts: %s", exc)
            return
        stage = GaugeMetricFamily(
            "slmfleet_rollout_stage", "current stage (1-based) of each rollout in progress",
            labels=["rollout", "model", "version", "state"],
        )
        devices = GaugeMetricFamily(
            "slmfleet_rollout_devices", "devices of each rollout in progress by their state",
            labels=["rollout", "state"],
        )
        value = GaugeMetricFamily(
            "slmfleet_rollout_gate_value", "what the latest evaluation of a gate measured",
            labels=["rollout", "gate", "tier"],
        )
        threshold = GaugeMetricFamily(
            "slmfleet_rollout_gate_threshold", "the threshold that gate is held to",
            labels=["rollout", "gate", "tier"],
        )
        verdict = GaugeMetricFamily(
            "slmfleet_rollout_gate_passing",
            "1 when the gate passes, 0 while it waits, -1 when it failed",
            labels=["rollout", "gate", "tier"],
        )
        for r in live:
            stage.add_metric([r.id, r.model_name, r.version, r.state], r.stage_index + 1)
            for gate in r.last_gates or []:
                labels = [r.id, str(gate.get("gate")), str(gate.get("tier") or "all")]
                if gate.get("measured") is not None:
                    value.add_metric(labels, float(gate["measured"]))
                if gate.get("threshold") is not None:
                    threshold.add_metric(labels, float(gate["threshold"]))
                verdict.add_metric(labels, _VERDICT.get(str(gate.get("verdict")), 0))
        for rollout_id, state, count in counts:
            devices.add_metric([rollout_id, state], count)
        yield from (stage, devices, value, threshold, verdict)

    def _device_metrics(self) -> Iterator[Metric]:
        try:
            with self._context.sessions() as session:
                counts = count_devices_by_tier_and_state(session)
                by_form = count_devices_by_form(session)
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
        forms = GaugeMetricFamily(
            "slmfleet_devices_by_assignment_form",
            "devices by the desired-state form their agent reads: single (one model, "
            "slmfleet.hello/1; upgrade to assign more) or set (slmfleet.hello/2)",
            labels=["form"],
        )
        for form in ("single", "set"):
            forms.add_metric([form], dict(by_form).get(form, 0))
        yield forms


def build_registry(context: AppContext) -> CollectorRegistry:
    """A fresh registry holding the control plane's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlPlaneCollector(context))
    return registry
