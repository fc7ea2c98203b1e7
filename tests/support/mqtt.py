"""MQTT helpers for tests: raw paho clients speaking to the shared broker."""

from __future__ import annotations

import secrets
import threading
import time
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controlplane.devfleet.mosquitto import MosquittoBroker


class RawClient:
    """A paho MQTT v5 client that records CONNACK, PUBACK codes and messages."""

    def __init__(self, broker_url: str, username: str, password: str, client_id: str | None = None):
        url = urlsplit(broker_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 1883
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{username}-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.connack: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, rc, props=None) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, rc, props=None) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and wait for the CONNACK; return its reason code."""
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self.connack is not None, timeout)
        assert self.connack is not None, "no CONNACK from broker"
        return self.connack

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> ReasonCode:
        """Publish and wait for the broker's PUBACK; return its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._cond:
            self._cond.wait_for(lambda: info.mid in self.pubacks, timeout)
        return self.pubacks[info.mid]

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos=qos)

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def provision_device(broker: MosquittoBroker, device_id: str, timeout: float = 5.0) -> str:
    """Give ``device_id`` broker credentials and wait until the broker accepts them."""
    password = secrets.token_urlsafe(16)
    broker.add_users({device_id: password})
    deadline = time.monotonic() + timeout
    while True:
        probe = RawClient(broker.url, device_id, password)
        try:
            rc = probe.connect(timeout=2.0)
        finally:
            probe.close()
        if not rc.is_failure:
            return password
        if time.monotonic() > deadline:
            raise AssertionError(f"broker never accepted credentials for {device_id}: {rc}")
        time.sleep(0.05)
