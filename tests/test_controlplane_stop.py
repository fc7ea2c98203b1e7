"""Stopping `slmfleet controlplane serve` the way its supervisors do.

systemd's default KillMode=control-group, `timeout` and Ctrl-C in a terminal
signal every process of the service at once, the ingest's writer process
included. The control plane decides when its writer stops: it ships what it
has received, then the writer writes it and exits. A writer that died of the
signal first would lose that batch and be restarted in the middle of a stop.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

import protocol as p
from controlplane.db import TelemetryRow, make_engine
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import telemetry, wait_until
from tests.support.mqtt import RawClient
from tests.support.serve import ServeProcess, write_config

pytestmark = pytest.mark.integration

MESSAGES = 50


def _count(api_url: str, counter: str) -> int:
    return httpx.get(f"{api_url}/v1/ingest/stats", headers=ADMIN_HEADERS,
                     timeout=5).json()[counter]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemd", "ctrl-c"])
@pytest.mark.parametrize("held_by", ["received", "accepted"],
                         ids=["in-the-control-plane", "in-the-writer"])
def test_a_stop_sent_to_every_process_writes_all_that_was_received(
    tmp_path: Path, broker, cp_credentials, sig: signal.Signals, held_by: str
) -> None:
    """``held_by``: the stop lands while the messages wait in the MQTT process's
    batch (received) or in the writer's (accepted, not yet written)."""
    username, password = cp_credentials
    database_url = f"sqlite:///{tmp_path / 'cp.db'}"
    serve = ServeProcess(write_config(
        tmp_path / "cp.toml", data_dir=tmp_path / "data", database_url=database_url,
        mqtt_url=broker.url, mqtt_username=username, mqtt_password=password, api_port=0,
        bootstrap_token=ADMIN_TOKEN,
        # Batches wait 2 s before they are shipped and written, so the stop
        # lands while every message is still on its way to the database.
        ingest_flush_ms=2000, ingest_batch_max=10_000,
    ))
    sender = RawClient(broker.url, username, password)
    sender.connect()
    try:
        probe = p.device_topic("stop-probe", p.TopicKind.TELEMETRY)

        def probe_heard() -> bool:
            sender.publish(probe, p.encode(telemetry("stop-probe", 0)))
            return _count(serve.api_url, "received") > 0

        wait_until(probe_heard, 15, "the ingest to subscribe", poll=0.2)
        wait_until(lambda: _count(serve.api_url, "written") > 0, 15, "the probe written")
        before = _count(serve.api_url, held_by)
        topic = p.device_topic("stop-dev", p.TopicKind.TELEMETRY)
        for seq in range(MESSAGES):
            sender.publish(topic, p.encode(telemetry("stop-dev", seq)))
        wait_until(lambda: _count(serve.api_url, held_by) >= before + MESSAGES, 15,
                   f"every message {held_by}")
        assert _count(serve.api_url, "written") < before + MESSAGES, "written too soon"

        os.killpg(serve.proc.pid, sig)
        assert serve.proc.wait(timeout=30) == 0, serve.log()[-3000:]
    finally:
        sender.close()
        serve.stop()

    log = serve.log()
    assert "ingest worker exited" not in log, log[-3000:]
    assert "messages lost" not in log, log[-3000:]
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(TelemetryRow)
                                  .where(TelemetryRow.device_id == "stop-dev")).scalar_one()
    finally:
        engine.dispose()
    assert stored == MESSAGES
