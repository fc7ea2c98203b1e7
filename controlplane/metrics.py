"""Prometheus metrics, read at scrape time from the ingest and the database.

What a scrape reads does not grow with the fleet: device counts come from
``device_counts`` (kept by the database as devices are written), evaluation
scores from a cache recomputed only when a new ``evaluated`` event or a
rollout change arrives (:mod:`.metrics_cache`), and rollout figures from
the rollouts still moving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from controlplane.rollouts.eval_scores import METRIC_ROLLOUTS, recent_eval_scores
from protocol import EventType

from .context import AppContext
from .db.device_counts import read_counts
from .db.models import DeviceEvent, Rollout, RolloutDevice
from .db.statuses import MOVING_ROLLOUT_STATES

log = logging.getLogger(__name__)

_VERDICT = {"pass": 1, "wait": 0, "fail": -1}

#: the longest a cached score table is served unchanged: what its key does not
#: see (a member moved to a new assignment with no evaluated event yet) is
#: caught up within this
EVAL_CACHE_MAX_AGE_S = 60.0


class EvalScoreCache:
    """The newest rollouts' score tables, recomputed only when what they read moved.

    Computing them reads every member of ten rollouts and their events, which
    grows with the fleet. The key is the newest ``evaluated`` event (an
    index lookup) and the newest rollouts' ids, states and stages (a few
    rows); a scrape with the same key gets the tables computed before.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_age_s: float = EVAL_CACHE_MAX_AGE_S) -> None:
        self._clock = clock
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._key: object = None
        self._at = 0.0
        self._rows: list[tuple[str, str, dict[str, Any]]] = []
        #: how many times the tables were computed (what tests and benches check)
        self.computed = 0

    @staticmethod
    def key(conn: Connection) -> tuple[object, ...]:
        """What the score tables depend on that a scrape can read cheaply."""
        newest = conn.execute(select(func.max(DeviceEvent.id))
                              .where(DeviceEvent.type == EventType.EVALUATED.value)).scalar()
        recent = conn.execute(
            select(Rollout.id, Rollout.state, Rollout.stage_index)
            .order_by(Rollout.created_at.desc()).limit(METRIC_ROLLOUTS)).all()
        return newest, tuple(tuple(r) for r in recent)

    def read(self, conn: Connection) -> list[tuple[str, str, dict[str, Any]]]:
        """(rollout id, model, score row) as :func:`recent_eval_scores` gives them."""
        key = self.key(conn)
        with self._lock:
            if key == self._key and self._clock() - self._at < self._max_age_s:
                return self._rows
            # No evaluated event at all: every table is empty, nothing to read.
            rows = recent_eval_scores(conn) if key[0] is not None else []
            self.computed += 1
            self._key, self._at, self._rows = key, self._clock(), rows
            return rows


class ControlPlaneCollector(Collector):
    """Ingest counters and devices by tier and online state.

    A custom collector rather than Counter objects updated on the hot path:
    the ingest already counts under its own lock, and this reads once per scrape.
    """

    def __init__(self, context: AppContext) -> None:
        self._context = context
        self._eval_scores = EvalScoreCache()

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
                rows = self._eval_scores.read(conn)
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
        """Devices by tier and state and by form, from the counts kept as rows are written."""
        try:
            with self._context.engine.connect() as conn:
                fleet = read_counts(conn)
        except SQLAlchemyError as exc:
            # The scrape still reports the ingest; health says the database is down.
            log.warning("metrics: cannot count devices: %s", exc)
            return
        devices = GaugeMetricFamily(
            "slmfleet_devices", "devices by tier and online state", labels=["tier", "online"]
        )
        for (tier, online), count in fleet.by_tier_and_state.items():
            devices.add_metric([tier or "unknown", "true" if online else "false"], count)
        yield devices
        forms = GaugeMetricFamily(
            "slmfleet_devices_by_assignment_form",
            "devices by the desired-state form their agent reads: single (one model, "
            "slmfleet.hello/1; upgrade to assign more) or set (slmfleet.hello/2)",
            labels=["form"],
        )
        for form in ("single", "set"):
            forms.add_metric([form], fleet.by_form.get(form, 0))
        yield forms


def build_registry(context: AppContext) -> CollectorRegistry:
    """A fresh registry holding the control plane's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlPlaneCollector(context))
    return registry
