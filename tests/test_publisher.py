"""The desired-state publisher against a real Mosquitto that limits unacknowledged
publishes (MQTT v5 Receive Maximum, from its CONNACK): it keeps to that window,
which MQTT v5 requires (brokers such as EMQX disconnect a client past it), and a
stage of many devices still goes out whole."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from sqlalchemy import insert

from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.db import make_engine, upgrade_to_head
from controlplane.db.models import (
    AssignmentRecord,
    DesiredDocument,
    Device,
    DeviceSequence,
    Model,
    ModelVersion,
)
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.publisher import DesiredPublisher
from protocol import TOPIC_ROOT, TopicKind, device_topic
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import RawClient

DEVICES = 40
RECEIVE_MAXIMUM = 5


def _owe(engine, device_ids: list[str]) -> None:
    """Rows as the director leaves them: an active assignment per device, not yet published."""
    now = time.time()
    with engine.begin() as conn:
        conn.execute(insert(Model), [{"name": "m", "created_at": now}])
        version_id = conn.execute(insert(ModelVersion).returning(ModelVersion.id), [{
            "model_name": "m", "version": "1.0.0", "sort_key": "1.0.0", "released_at": now,
            "registered_at": now, "manifest_sha256": "0" * 64, "envelope": "{}",
        }]).scalar_one()
        conn.execute(insert(Device), [{
            "id": d, "first_seen": now, "state_changed_at": now} for d in device_ids])
        conn.execute(insert(AssignmentRecord), [{
            "assignment_id": f"a-{d}", "device_id": d, "version_id": version_id,
            "ref": "m@1.0.0", "tier": "micro", "sequence": 1, "issued_at": now,
            "expires_at": now + 3600, "rollout_id": None, "kind": "assign", "status": "active",
            "ended_at": None, "model_name": "m"} for d in device_ids])
        conn.execute(insert(DeviceSequence), [
            {"device_id": d, "last_sequence": 1, "published_sequence": 0} for d in device_ids])
        conn.execute(insert(DesiredDocument), [
            {"device_id": d, "envelope": f'{{"for":"{d}"}}', "expires_at": now + 3600,
             "form": "single"} for d in device_ids])


def test_publisher_keeps_to_the_brokers_receive_maximum(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(8)
    broker = MosquittoBroker(tmp_path / "broker", users={CONTROL_PLANE_USER: password},
                             max_inflight=RECEIVE_MAXIMUM).start()
    settings = cp_settings(tmp_path / "cp", broker, (CONTROL_PLANE_USER, password),
                           database_url=f"sqlite:///{tmp_path / 'cp.db'}")
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    device_ids = [f"pub-{i:03d}" for i in range(DEVICES)]
    _owe(engine, device_ids)
    publisher = DesiredPublisher(settings, engine, poll_s=0.2).start()
    watcher = RawClient(broker.url, CONTROL_PLANE_USER, password)
    try:
        wait_until(lambda: publisher.published >= DEVICES, 30, "every desired published")
        assert publisher.window == RECEIVE_MAXIMUM
        assert publisher.connections == 1, "the publisher had to reconnect"
        watcher.connect()
        watcher.subscribe(f"{TOPIC_ROOT}/+/{TopicKind.DESIRED.value}")
        wait_until(lambda: len(watcher.messages) >= DEVICES, 10, "every retained desired")
        got = {m.topic: m.payload for m in watcher.messages}
        for d in device_ids:
            assert got[device_topic(d, TopicKind.DESIRED)] == f'{{"for":"{d}"}}'.encode()
    finally:
        watcher.close()
        publisher.stop()
        engine.dispose()
        broker.stop()
