"""The ingest's writer process: killed, it is restarted and the ingest goes on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import func, select

import protocol as p
from controlplane.db import make_engine
from controlplane.db.models import TelemetryRow
from controlplane.ingest import MqttIngest
from controlplane.service import ControlPlane
from tests.support.controlplane import cp_settings, hello, telemetry, wait_until
from tests.support.mqtt import RawClient


def _telemetry_rows(database_url: str, device_id: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                select(func.count()).where(TelemetryRow.device_id == device_id)
            ) or 0
    finally:
        engine.dispose()


def test_killed_writer_process_is_restarted_and_later_messages_land(
    tmp_path: Path, broker, new_device, cp_credentials
) -> None:
    settings = cp_settings(tmp_path / "cp", broker, cp_credentials)
    cp = ControlPlane(settings).start()
    device_id = "worker-kill-1"
    client = RawClient(broker.url, device_id, new_device(device_id))
    try:
        assert not client.connect().is_failure
        ingest = cp.ingest
        assert isinstance(ingest, MqttIngest)
        client.publish(p.device_topic(device_id, p.TopicKind.HELLO), p.encode(hello(device_id)),
                       retain=True)
        for seq in range(5):
            client.publish(p.device_topic(device_id, p.TopicKind.TELEMETRY),
                           p.encode(telemetry(device_id, seq)))
        # Counts alone can't tell: the shared broker replays other tests'
        # retained hellos to this control plane too.
        wait_until(lambda: _telemetry_rows(settings.database_url, device_id) == 5, 10,
                   "telemetry written by the first writer")

        writer = ingest.writer_pid
        assert writer is not None
        os.kill(writer, signal.SIGKILL)
        wait_until(lambda: ingest.writer_pid not in (None, writer), 10, "a new writer process")

        for seq in range(5, 10):
            client.publish(p.device_topic(device_id, p.TopicKind.TELEMETRY),
                           p.encode(telemetry(device_id, seq)))
        wait_until(lambda: _telemetry_rows(settings.database_url, device_id) == 10, 5,
                   "telemetry written by the restarted writer")
        assert ingest.flush(10), ingest.stats()
        # A SIGKILL can land between a commit and the report of it, so the
        # counters may call a written message lost; the rows above are the truth.
        assert ingest.stats().queue_depth == 0
    finally:
        client.close()
        cp.stop()


def test_stop_writes_everything_already_received(
    tmp_path: Path, broker, new_device, cp_credentials
) -> None:
    # A long flush interval keeps the last messages pending in the MQTT
    # process; stop() must still ship them and wait for the writer.
    settings = cp_settings(tmp_path / "cp", broker, cp_credentials, ingest_flush_ms=5000)
    cp = ControlPlane(settings).start()
    device_id = "worker-stop-1"
    client = RawClient(broker.url, device_id, new_device(device_id))
    ingest = cp.ingest
    assert ingest is not None
    time.sleep(0.3)  # let the broker replay other tests' retained messages first
    baseline = ingest.stats().received
    try:
        assert not client.connect().is_failure
        for seq in range(20):
            client.publish(p.device_topic(device_id, p.TopicKind.TELEMETRY),
                           p.encode(telemetry(device_id, seq)))
        wait_until(lambda: ingest.stats().received >= baseline + 20, 5, "messages received")
        time.sleep(0.5)
        assert _telemetry_rows(settings.database_url, device_id) < 20  # some still pending
    finally:
        client.close()
        cp.stop()
    assert _telemetry_rows(settings.database_url, device_id) == 20
