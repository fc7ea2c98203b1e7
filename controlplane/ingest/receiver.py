"""MQTT ingest: device messages in, validated, batched into the database.

Two processes share the work (see :mod:`controlplane.ingest.writer_process` for
why). Here, one paho network thread (``loop_start``) stamps each message
and appends it to a batch; a full batch, or one older than
``ingest_flush_ms``, is shipped raw through a pipe to the worker process,
which validates every payload (schema, size, device id in the payload
equal to the topic's), counts and logs the bad ones, and writes the good
ones in batches. When the worker falls behind, the pipe fills, the network
thread blocks, stops reading and stops acknowledging QoS 1 messages, so the
broker holds the backlog instead of either process growing without bound.

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

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

import protocol
from protocol import DEVICE_TO_CP

from ..config import ControlPlaneSettings
from ..logs import RateLimitedLog
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

KEEPALIVE_S = 30
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30
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
        self._batch_max = settings.ingest_batch_max
        self._flush_s = settings.ingest_flush_ms / 1000.0
        self._log = RateLimitedLog(log)
        # _ship_lock guards the pending batch and the pipe to the worker (one
        # writer at a time); _cond guards the counters the worker reports.
        self._ship_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: list[RawMessage] = []
        self._pending_since = 0.0
        self._received = 0
        #: counters of workers that died or were replaced, carried forward
        self._retired: dict[str, Any] = {}
        self._lost = 0
        self._worker: _WorkerHandle | None = None
        self._threads: list[threading.Thread] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._closing = threading.Event()
        self._auth_error: str | None = None
        self._subscribe_mid: int | None = None
        self._client: mqtt.Client | None = None
        self._connect_lock = threading.Lock()
        self._connect_started = False
        self._started = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the worker process; the MQTT network thread connects once it is up."""
        if self._started:
            raise RuntimeError("MqttIngest already started")
        self._started = True
        self._worker = _WorkerHandle(self._worker_config)
        settings = self._settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.mqtt_client_id or f"slmfleet-cp-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        password = settings.mqtt_password
        client.username_pw_set(
            settings.mqtt_username, password.get_secret_value() if password else None
        )
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        tls = settings.mqtt_tls_context()
        if tls is not None:
            client.tls_set_context(tls)
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        # The connection opens once the writer's first report says it is up
        # (see _collect_reports): a backlog the broker queued for us would
        # otherwise block the network thread for the writer's whole start-up.
        threads = ((self._collect_reports, "ingest-reports"), (self._tick, "ingest-tick"))
        for target, name in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _connect(self) -> None:
        """Open the MQTT connection (in the background); once, unless stopping."""
        settings = self._settings
        with self._connect_lock:
            client = self._client
            if client is None or self._connect_started or self._closing.is_set():
                return
            self._connect_started = True
            connect_props = None
            if settings.mqtt_session_expiry_s:
                connect_props = Properties(PacketTypes.CONNECT)
                connect_props.SessionExpiryInterval = settings.mqtt_session_expiry_s
            client.connect_async(
                settings.mqtt_host,
                settings.mqtt_port,
                KEEPALIVE_S,
                clean_start=not settings.mqtt_session_expiry_s,
                properties=connect_props,
            )
            client.loop_start()

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
            client, self._client = self._client, None
        if client is not None and self._connect_started:
            client.disconnect()
            # Joins the network thread; it sleeps at most 1 s between
            # reconnect checks, so this returns even with the broker gone.
            client.loop_stop()
        worker = self._worker
        if worker is not None:
            with self._ship_lock:
                self._ship_locked()
                # Already gone: the report collector has counted the loss.
                with contextlib.suppress(OSError):
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
        for reason, count in report.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + count
        totals["rejected"] = rejected
        totals["dropped"] += self._lost
        totals["last_batch_ms"] = report.get("last_batch_ms")
        totals["last_batch_size"] = report.get("last_batch_size", 0)
        totals["queue_depth"] = int(report.get("queue_depth", 0))
        return totals

    def stats(self) -> IngestStatsSnapshot:
        """Current counters; ``queue_depth`` counts everything not yet validated or written."""
        with self._ship_lock:
            pending = len(self._pending)
        with self._cond:
            totals = self._totals()
            worker = self._worker
            in_pipe = worker.shipped - int(worker.report.get("received", 0)) if worker else 0
            received = self._received
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
            with self._ship_lock:
                self._ship_locked()
            with self._cond:
                worker = self._worker
                if worker is not None and self._received >= received_at_least:
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

    def _ship_locked(self) -> None:
        """Send the pending batch to the worker; caller holds ``_ship_lock``."""
        if not self._pending or self._worker is None:
            return
        batch, self._pending = self._pending, []
        worker = self._worker
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

    def _tick(self) -> None:
        """Ship a batch that has waited ``flush_s``, however small."""
        while not self._closing.wait(self._flush_s / 2):
            with self._ship_lock:
                if self._pending and time.monotonic() - self._pending_since >= self._flush_s:
                    self._ship_locked()

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

    # -- paho callbacks (network thread) ------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            if reason.value in (0x86, 0x87, 0x8C):  # bad credentials / not authorized / bad auth
                self._auth_error = f"broker refused the control plane's login: {reason}"
            self._log.log(logging.ERROR, "connect", "MQTT connect failed: %s", reason)
            return
        self._auth_error = None
        self._connected.set()
        group = self._settings.mqtt_shared_group
        # Subscribe on every (re)connect: after a broker restart the session
        # and its subscriptions are gone. Retained hellos and states are
        # replayed only for a new subscription, not into a resumed session.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        result, mid = client.subscribe(
            [(protocol.subscription(kind, group), options) for kind in DEVICE_TO_CP]
        )
        if result != mqtt.MQTT_ERR_SUCCESS:
            log.error("MQTT subscribe could not be sent: %s", mqtt.error_string(result))
        self._subscribe_mid = mid
        log.info("connected to %s; subscribing", self._settings.mqtt_url)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("broker refused ingest subscriptions: %s", ", ".join(refused))
            return
        self._subscribed.set()

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._closing.is_set():
            self._log.log(
                logging.WARNING, "disconnect", "MQTT disconnected (%s); reconnecting", reason
            )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # The hot path, on paho's only thread: stamp and batch, nothing else.
        # Validation happens in the worker process.
        with self._ship_lock:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append((msg.topic, msg.payload, msg.retain, time.time()))
            self._received += 1
            if len(self._pending) >= self._batch_max:
                self._ship_locked()
