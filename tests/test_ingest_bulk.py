"""The ingest's own MQTT connection against real brokers: bulk reads, refusals, backpressure.

A scripted broker (a real socket speaking MQTT v5 bytes) delivers what
Mosquitto never would: malformed and oversized packets, a packet cut across
two reads. Real Mosquitto (ACLs on) covers the rest: a stalled writer, a
broker restart, a wrong password.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

import protocol as p
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.config import ControlPlaneSettings
from controlplane.db import make_engine
from controlplane.db.migrate import upgrade_to_head
from controlplane.db.models import TelemetryRow
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.ingest import MqttAuthError, MqttIngest, wire
from tests.support.controlplane import cp_settings, hello, telemetry, wait_until
from tests.support.mqtt import RawClient, provision_device

pytestmark = pytest.mark.integration


def _settings(data_dir: Path, broker_url: str, credentials: tuple[str, str],
              **overrides: object) -> ControlPlaneSettings:
    settings = cp_settings(data_dir, SimpleNamespace(url=broker_url), credentials,  # type: ignore[arg-type]
                           **overrides)
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.database_url)
    return settings


def _telemetry_seqs(database_url: str, device_id: str) -> list[int]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(select(TelemetryRow.seq)
                                     .where(TelemetryRow.device_id == device_id)
                                     .order_by(TelemetryRow.seq)))
    finally:
        engine.dispose()


def _count(database_url: str, device_id: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(func.count()).where(TelemetryRow.device_id == device_id)) or 0
    finally:
        engine.dispose()


def _quiet(ingest: MqttIngest, seconds: float) -> bool:
    """True when ``ingest`` received nothing over ``seconds``."""
    before = ingest.stats().received
    time.sleep(seconds)
    return ingest.stats().received == before


@pytest.fixture
def ingests() -> Iterator[list[MqttIngest]]:
    """Ingests a test starts; stopped at teardown."""
    started: list[MqttIngest] = []
    yield started
    for ingest in started:
        ingest.stop()


# -- a scripted broker ------------------------------------------------------------------


def _publish(topic: str | bytes, payload: bytes, packet_id: int) -> bytes:
    name = topic.encode() if isinstance(topic, str) else topic
    body = struct.pack("!H", len(name)) + name + struct.pack("!H", packet_id) + b"\x00" + payload
    return b"\x32" + wire.varint(len(body)) + body


class ScriptedBroker:
    """Accepts one MQTT v5 client, grants its CONNECT and SUBSCRIBE, then sends what it is told."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self._server.getsockname()[1]}"
        self._conn: socket.socket | None = None
        self._ready = threading.Event()
        self.acked: list[int] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        self._conn = conn
        reader = wire.FrameReader(1 << 20)
        granted = False
        while True:
            try:
                data = conn.recv(65536)
            except OSError:  # closed by the test
                return
            if not data:
                return
            space = reader.space()
            space[:len(data)] = data
            space.release()
            reader.advance(len(data))
            for first, body in reader.frames():  # type: ignore[misc]
                kind = first >> 4
                if kind == 1:  # CONNECT
                    conn.sendall(b"\x20\x03\x00\x00\x00")
                elif kind == 8 and not granted:  # SUBSCRIBE: grant QoS 1 to each topic
                    packet_id = body[:2]
                    count = body[3:].count(b"\x11")
                    suback = packet_id + b"\x00" + b"\x01" * count
                    conn.sendall(b"\x90" + wire.varint(len(suback)) + suback)
                    granted = True
                    self._ready.set()
                elif kind == wire.PUBACK:
                    with self._lock:
                        self.acked.append(struct.unpack("!H", body[:2])[0])

    def send(self, data: bytes) -> None:
        assert self._ready.wait(30), "the ingest never subscribed"
        assert self._conn is not None
        self._conn.sendall(data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._server.close()


def test_many_packets_per_read_cut_packets_and_bad_packets_from_the_broker(
    tmp_path: Path, ingests: list[MqttIngest]
) -> None:
    fake = ScriptedBroker()
    try:
        settings = _settings(tmp_path / "cp", fake.url, ("slmfleet-cp", "pw"))
        ingest = MqttIngest(settings)
        ingests.append(ingest)
        ingest.start()
        assert ingest.wait_ready(60)
        device_id = "bulk-1"
        topic = p.device_topic(device_id, p.TopicKind.TELEMETRY)
        # 300 packets in one send: most reads take many of them.
        burst = _publish(p.device_topic(device_id, p.TopicKind.HELLO),
                         p.encode(hello(device_id)), 1)
        burst += b"".join(_publish(topic, p.encode(telemetry(device_id, seq)), seq + 2)
                          for seq in range(300))
        fake.send(burst)
        wait_until(lambda: len(_telemetry_seqs(settings.database_url, device_id)) == 300, 30,
                   "300 heartbeats from one burst")
        # a packet cut in two, the halves apart: it lands once, whole
        cut = _publish(topic, p.encode(telemetry(device_id, 300)), 400)
        fake.send(cut[:37])
        time.sleep(0.3)
        fake.send(cut[37:])
        # then what a broker should never send, each followed by a good packet
        bad_topic_length = b"\x32\x05\x00\xff\x61\x01\xf4"  # topic runs past the packet
        bad_utf8 = _publish(b"slmfleet/\xff/telemetry", b"{}", 401)
        oversized = _publish(topic, b"x" * (1_200_000), 402)
        fake.send(bad_topic_length + bad_utf8)
        for at in range(0, len(oversized), 100_000):
            fake.send(oversized[at:at + 100_000])
        fake.send(_publish(topic, p.encode(telemetry(device_id, 301)), 403))
        wait_until(lambda: _telemetry_seqs(settings.database_url, device_id)[-2:] == [300, 301],
                   30, "the cut packet and the one after the bad ones")
        assert _telemetry_seqs(settings.database_url, device_id) == list(range(302))
        rejected = ingest.stats().rejected
        assert rejected["malformed"] == 2 and rejected["too_large"] == 1, rejected
        # every packet whose id could be read is acknowledged, and only once
        wait_until(lambda: len(fake.acked) >= 304, 10, f"acknowledgements ({fake.acked[-5:]})")
        assert sorted(fake.acked) == [*range(1, 302), 400, 401, 402, 403]
        assert ingest.connected  # none of it cost the connection
    finally:
        fake.close()


# -- real Mosquitto -----------------------------------------------------------------------


def test_wrong_credentials_raise_auth_error_naming_the_settings(
    tmp_path: Path, broker, ingests: list[MqttIngest]
) -> None:
    settings = _settings(tmp_path / "cp", broker.url, (CONTROL_PLANE_USER, "not-the-password"))
    ingest = MqttIngest(settings)
    ingests.append(ingest)
    ingest.start()
    refusal = r"refused the control plane's login: .* check mqtt_username and mqtt_password"
    with pytest.raises(MqttAuthError, match=refusal):
        ingest.wait_ready(60)


def test_a_stalled_writer_stops_the_acks_and_the_broker_delivers_the_rest_again(
    tmp_path: Path, broker, new_device, cp_credentials, ingests: list[MqttIngest]
) -> None:
    # A persistent session: what the first ingest did not acknowledge is
    # delivered again to the next connection with its client id.
    settings = _settings(tmp_path / "cp", broker.url, cp_credentials, ingest_batch_max=50,
                         mqtt_client_id=f"cp-stall-{secrets.token_hex(3)}",
                         mqtt_session_expiry_s=300)
    first = MqttIngest(settings)
    ingests.append(first)
    first.start()
    assert first.wait_ready(60)
    device_id = f"stall-{secrets.token_hex(3)}"
    client = RawClient(broker.url, device_id, new_device(device_id))
    total = 3000
    try:
        assert not client.connect().is_failure
        client.publish(p.device_topic(device_id, p.TopicKind.HELLO), p.encode(hello(device_id)))
        writer = first.writer_pid
        assert writer is not None
        os.kill(writer, signal.SIGSTOP)
        topic = p.device_topic(device_id, p.TopicKind.TELEMETRY)
        infos = [client.client.publish(topic, p.encode(telemetry(device_id, seq)), qos=1)
                 for seq in range(total)]
        for info in infos:
            info.wait_for_publish(30)

        # reading stops once the pipe to the stalled writer is full
        wait_until(lambda: _quiet(first, 1.0), 30, "reading to stop")
        stalled = first.stats().received
        assert stalled < total / 2, "the receiver kept reading for a stalled writer"

        second = MqttIngest(settings)  # takes the session over
        ingests.append(second)
        stopping = threading.Thread(target=first.stop)
        stopping.start()  # first stops instead of taking the session back
        time.sleep(0.2)
        os.kill(writer, signal.SIGCONT)
        stopping.join(30)
        second.start()
        assert second.wait_ready(60)
        wait_until(lambda: _count(settings.database_url, device_id) >= total, 60,
                   "every heartbeat written")
        assert second.flush(30)
        assert _telemetry_seqs(settings.database_url, device_id) == list(range(total))
        # Every heartbeat reached one of the two: what the first never acknowledged
        # the broker delivered again, to the second or (when the first, resumed
        # while stopping, read on before the second took the session) to the first.
        assert first.stats().received + second.stats().received >= total
    finally:
        client.close()


def test_a_broker_restart_is_reconnected_and_later_messages_land(
    tmp_path: Path, ingests: list[MqttIngest]
) -> None:
    password = secrets.token_urlsafe(12)
    with MosquittoBroker(tmp_path / "broker", users={CONTROL_PLANE_USER: password}) as own:
        settings = _settings(tmp_path / "cp", own.url, (CONTROL_PLANE_USER, password))
        ingest = MqttIngest(settings)
        ingests.append(ingest)
        ingest.start()
        assert ingest.wait_ready(60)
        device_id = "restart-1"
        device_password = provision_device(own, device_id)

        def send(seqs: range) -> None:
            client = RawClient(own.url, device_id, device_password)
            try:
                assert not client.connect(10).is_failure
                client.publish(p.device_topic(device_id, p.TopicKind.HELLO),
                               p.encode(hello(device_id)))
                for seq in seqs:
                    client.publish(p.device_topic(device_id, p.TopicKind.TELEMETRY),
                                   p.encode(telemetry(device_id, seq)))
            finally:
                client.close()

        send(range(5))
        wait_until(lambda: len(_telemetry_seqs(settings.database_url, device_id)) == 5, 30,
                   "heartbeats before the restart")
        own.stop()
        wait_until(lambda: not ingest.connected, 30, "the ingest to see the broker gone")
        own.start()
        wait_until(lambda: ingest.connected, 30, "the ingest to reconnect")
        send(range(5, 10))
        wait_until(lambda: len(_telemetry_seqs(settings.database_url, device_id)) == 10, 30,
                   "heartbeats after the restart")
        assert _telemetry_seqs(settings.database_url, device_id) == list(range(10))
