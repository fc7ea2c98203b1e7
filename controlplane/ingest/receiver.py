"""MQTT ingest: device messages in, validated, batched into the database.

Two processes share the work (see :mod:`controlplane.ingest.writer_process` for
why). Here, one connection thread (:class:`.connection.BulkLink`) reads
every message the broker has sent in one go, stamps each and ships the
batch raw through a pipe to the worker process, which validates every
payload (schema, size, device id in the payload equal to the topic's),
counts and logs the bad ones, and writes the good ones in batches. A batch
is acknowledged to the broker once the worker has it. When the worker falls
behind, the pipe fills, the connection thread blocks, stops reading and
stops acknowledging, so the broker holds the backlog instead of either
process growing without bound.

A worker that dies is restarted; what it held is counted as dropped.
Nothing a device sends can stop the ingest.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import secrets
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import protocol
from protocol import DEVICE_TO_CP

from ..config import ControlPlaneSettings
from ..logs import RateLimitedLog
from .connection import BulkLink, LinkConfig, LinkEvents
from .decode import DeviceIdMismatch, EmptyPayload, decode_device_message
from .stats import IngestStatsSnapshot
from .writer_process import STOP, RawMessage, WorkerConfig, encode_batch, run_worker

log = logging.getLogger(__name__)

__all__ = [
    "DeviceIdMismatch",
    "EmptyPayload",
    "MqttAuthError",
    "MqttIngest",
    "decode_device_message",
]

#: worker counters that add up across worker restarts
_SUMMED = ("received", "accepted", "written", "dropped", "batches", "write_errors", "settled")


class MqttAuthError(RuntimeError):
    """The broker refused the control plane's credentials or authorisation."""


class _WorkerHandle:
    """One worker process and both ends of its pipes, as the parent sees them."""

    def __init__(self, config: WorkerConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        worker_inbox, self.inbox = ctx.Pipe(duplex=False)
        self.outbox, worker_outbox = ctx.Pipe(duplex=False)
        self.process: BaseProcess = ctx.Process(
            target=run_worker,
            args=(config, worker_inbox, worker_outbox),
            name="slmfleet-ingest-writer",
            daemon=True,
        )
        self.process.start()
        # The child holds its own copies; closing ours lets EOF reach each side.
        worker_inbox.close()
        worker_outbox.close()
        #: messages shipped to this worker
        self.shipped = 0
        #: its latest counters (IngestStats.export)
        self.report: dict[str, Any] = {}

    def close(self) -> None:
        for conn in (self.inbox, self.outbox):
            conn.close()


class MqttIngest:
    """Subscribe to every device's hello/state/telemetry/events and store them."""

    def __init__(self, settings: ControlPlaneSettings) -> None:
        self._settings = settings
        self._worker_config = WorkerConfig(
            database_url=settings.database_url,
            batch_max=settings.ingest_batch_max,
            flush_s=settings.ingest_flush_ms / 1000.0,
            queue_max=settings.ingest_queue_max,
            log_level=logging.getLogger().getEffectiveLevel(),
            max_clock_skew_s=settings.ingest_max_clock_skew_s,
        )
        self._log = RateLimitedLog(log)
        # _ship_lock keeps one writer at a time on the pipe to the worker;
        # _cond guards the counters the worker reports.
        self._ship_lock = threading.Lock()
        self._cond = threading.Condition()
        #: counters of workers that died or were replaced, carried forward
        self._retired: dict[str, Any] = {}
        #: packets the connection could not read, by reason (the worker counts payloads)
        self._refused_packets: dict[str, int] = {}
        self._lost = 0
        self._worker: _WorkerHandle | None = None
        self._threads: list[threading.Thread] = []
        self._subscribed = threading.Event()
        self._closing = threading.Event()
        self._auth_error: str | None = None
        self._link: BulkLink | None = None
        self._connect_lock = threading.Lock()
        self._started = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the worker process; the MQTT connection opens once it is up."""
        if self._started:
            raise RuntimeError("MqttIngest already started")
        self._started = True
        self._worker = _WorkerHandle(self._worker_config)
        # The connection opens once the writer's first report says it is up
        # (see _collect_reports): a backlog the broker queued for us would
        # otherwise block the connection thread for the writer's whole start-up.
        thread = threading.Thread(target=self._collect_reports, name="ingest-reports",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _connect(self) -> None:
        """Open the MQTT connection (in the background); once, unless stopping."""
        settings = self._settings
        with self._connect_lock:
            if self._link is not None or self._closing.is_set():
                return
            password = settings.mqtt_password
            group = settings.mqtt_shared_group
            config = LinkConfig(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                client_id=settings.mqtt_client_id or f"slmfleet-cp-{secrets.token_hex(4)}",
                username=settings.mqtt_username,
                password=password.get_secret_value() if password else None,
                topics=[protocol.subscription(kind, group) for kind in DEVICE_TO_CP],
                clean_start=not settings.mqtt_session_expiry_s,
                session_expiry_s=settings.mqtt_session_expiry_s,
                flush_s=settings.ingest_flush_ms / 1000.0,
                batch_max=settings.ingest_batch_max,
                tls=settings.mqtt_tls_context(),
            )
            events = LinkEvents(hand_off=self._ship, subscribed=self._on_subscribed,
                                refused=self._on_refused, rejected=self._on_rejected_packet)
            self._link = BulkLink(config, events)
            self._link.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until subscribed and the writer process is up.

        Raises :class:`MqttAuthError` if the broker refused us.
        """
        deadline = time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if self._auth_error:
                raise MqttAuthError(self._auth_error)
            if time.monotonic() > deadline:
                return False
        # The writer's first report says its database engine is ready; until
        # then the first messages would wait on the process start-up.
        with self._cond:
            return self._cond.wait_for(
                lambda: self._worker is not None and bool(self._worker.report),
                max(deadline - time.monotonic(), 0.0),
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect, write what was received, stop the worker. Idempotent."""
        if self._closing.is_set():
            return
        with self._connect_lock:
            self._closing.set()
            link = self._link
        if link is not None:
            # Hands off and acknowledges what it read, then disconnects.
            link.stop(timeout)
        worker = self._worker
        if worker is not None:
            # Already gone: the report collector has counted the loss.
            with self._ship_lock, contextlib.suppress(OSError):
                worker.inbox.send_bytes(STOP)
            worker.process.join(timeout + 5.0)
            if worker.process.is_alive():
                log.error("ingest worker did not stop in time; terminating it")
                worker.process.terminate()
                worker.process.join(5.0)
        for thread in self._threads:
            thread.join(5.0)
        if worker is not None:
            worker.close()

    # -- state -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected to the broker and subscribed."""
        return self._subscribed.is_set()

    @property
    def writer_pid(self) -> int | None:
        """The process id of the live writer process; None when none is running.

        It changes when a writer that died is replaced.
        """
        with self._cond:
            worker = self._worker
        if worker is None or not worker.process.is_alive():
            return None
        return worker.process.pid

    def _totals(self) -> dict[str, Any]:
        # Under self._cond: the live worker's counters plus those of retired ones.
        report = self._worker.report if self._worker else {}
        totals: dict[str, Any] = {}
        for key in _SUMMED:
            totals[key] = int(report.get(key, 0)) + int(self._retired.get(key, 0))
        rejected = dict(self._retired.get("rejected", {}))
        for source in (report.get("rejected", {}), self._refused_packets):
            for reason, count in source.items():
                rejected[reason] = rejected.get(reason, 0) + count
        totals["rejected"] = rejected
        totals["dropped"] += self._lost
        totals["last_batch_ms"] = report.get("last_batch_ms")
        totals["last_batch_size"] = report.get("last_batch_size", 0)
        totals["queue_depth"] = int(report.get("queue_depth", 0))
        return totals

    def stats(self) -> IngestStatsSnapshot:
        """Current counters; ``queue_depth`` counts everything not yet validated or written."""
        link = self._link
        pending, received = (link.pending, link.received) if link else (0, 0)
        with self._cond:
            totals = self._totals()
            worker = self._worker
            in_pipe = worker.shipped - int(worker.report.get("received", 0)) if worker else 0
        accepted_waiting = totals["accepted"] - totals["settled"]
        return IngestStatsSnapshot(
            received=received,
            accepted=totals["accepted"],
            written=totals["written"],
            rejected=totals["rejected"],
            dropped=totals["dropped"],
            batches=totals["batches"],
            last_batch_ms=totals["last_batch_ms"],
            last_batch_size=totals["last_batch_size"],
            write_errors=totals["write_errors"],
            queue_depth=pending + max(in_pipe, 0) + max(accepted_waiting, 0),
            queue_max=self._settings.ingest_queue_max,
            connected=self.connected,
        )

    def flush(self, timeout: float = 10.0, *, received_at_least: int = 0) -> bool:
        """Wait until ``received_at_least`` messages arrived and every one is settled.

        Settled: validated and then written, rejected or dropped. For tests and
        benchmarks; returns False on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            link = self._link
            if link is not None:
                link.hurry()
            pending, received = (link.pending, link.received) if link else (0, 0)
            with self._cond:
                worker = self._worker
                if worker is not None and received >= received_at_least and not pending:
                    report = worker.report
                    if (
                        int(report.get("received", 0)) >= worker.shipped
                        and report.get("settled", 0) >= report.get("accepted", 0)
                    ):
                        return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))

    # -- the pipe to the worker -----------------------------------------------

    def _ship(self, batch: list[RawMessage]) -> None:
        """Send a batch to the worker; blocks while it is behind."""
        with self._ship_lock:
            worker = self._worker
            if worker is None:
                return
            try:
                # Blocks while the worker is behind: that is the backpressure.
                worker.inbox.send_bytes(encode_batch(batch))
            except OSError as exc:
                with self._cond:
                    self._lost += len(batch)
                self._log.log(
                    logging.ERROR, "ship", "ingest worker unreachable (%s); %d messages lost",
                    exc, len(batch),
                )
                return
            with self._cond:
                worker.shipped += len(batch)

    def _collect_reports(self) -> None:
        """Receive the worker's counters; restart the worker if it dies."""
        while True:
            worker = self._worker
            if worker is None:
                return
            try:
                report = worker.outbox.recv()
            except (EOFError, OSError):
                if self._closing.is_set():
                    return
                self._restart_worker(worker)
                continue
            with self._cond:
                worker.report = report
                self._cond.notify_all()
            self._connect()

    def _restart_worker(self, dead: _WorkerHandle) -> None:
        dead.process.join(1.0)
        with self._ship_lock, self._cond:
            report = dead.report
            received = int(report.get("received", 0))
            unsettled = int(report.get("accepted", 0)) - int(report.get("settled", 0))
            # Shipped but never read, or accepted but not reported written:
            # gone, or committed just before the kill; it cannot tell which.
            lost = max(dead.shipped - received, 0) + max(unsettled, 0)
            self._lost += lost
            for key, value in report.items():
                if key == "rejected":
                    merged = self._retired.setdefault("rejected", {})
                    for reason, count in value.items():
                        merged[reason] = merged.get(reason, 0) + count
                elif key in _SUMMED:
                    self._retired[key] = int(self._retired.get(key, 0)) + int(value)
            # Its unwritten messages are accounted as dropped, so settled.
            self._retired["settled"] = int(self._retired.get("settled", 0)) + max(unsettled, 0)
            log.error(
                "ingest worker exited (code %s); up to %d messages lost; restarting it",
                dead.process.exitcode,
                lost,
            )
            dead.close()
            self._worker = _WorkerHandle(self._worker_config)
            self._cond.notify_all()

    # -- the connection's events (its thread) -----------------------------------

    def _on_subscribed(self, subscribed: bool) -> None:
        if subscribed:
            self._auth_error = None
            self._subscribed.set()
            log.info("subscribed at %s", self._settings.mqtt_url)
        else:
            self._subscribed.clear()

    def _on_refused(self, message: str) -> None:
        self._auth_error = message
        self._log.log(logging.ERROR, "connect", "%s", message)

    def _on_rejected_packet(self, reason: str) -> None:
        with self._cond:
            self._refused_packets[reason] = self._refused_packets.get(reason, 0) + 1
