"""The agent's MQTT v5 link to the control plane.

aiomqtt drives paho-mqtt from the asyncio loop (one event loop, no extra
network thread). The link publishes a retained ``hello`` and ``state=online``
on every connect, sets ``state=offline`` as the Last Will so a crash or power
cut is noticed, subscribes to the device's own ``desired`` topic, and
reconnects with jittered backoff. A clean shutdown publishes ``offline``
itself before disconnecting (a clean DISCONNECT suppresses the will).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiomqtt

from protocol import DeviceState, State, TopicKind, device_topic, encode

from .backoff import Backoff
from .config import AgentConfig

log = logging.getLogger(__name__)

DesiredHandler = Callable[[bytes], Awaitable[None]]
ConnectedHandler = Callable[[], Awaitable[None]]


class MqttLink:
    """One device's connection to the broker, kept alive until :meth:`close`."""

    def __init__(
        self,
        config: AgentConfig,
        hello: Callable[[], bytes],
        on_desired: DesiredHandler | None = None,
        on_connected: ConnectedHandler | None = None,
    ) -> None:
        self._config = config
        self._hello = hello
        self._on_desired = on_desired
        self._on_connected = on_connected
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self.connected = asyncio.Event()
        self.connects = 0
        self.backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s)

    def _topic(self, kind: TopicKind) -> str:
        return device_topic(self._config.device_id, kind)

    def _state(self, state: DeviceState) -> bytes:
        return encode(State(device_id=self._config.device_id, state=state, ts=time.time()))

    def _make_client(self) -> aiomqtt.Client:
        url = urlsplit(self._config.broker_url)
        tls_context = None
        if url.scheme == "mqtts":
            tls_context = ssl.create_default_context(
                cafile=str(self._config.tls_ca_file) if self._config.tls_ca_file else None
            )
        return aiomqtt.Client(
            url.hostname or "127.0.0.1",
            url.port or (8883 if url.scheme == "mqtts" else 1883),
            username=self._config.mqtt_username,
            password=self._config.mqtt_password(),
            identifier=self._config.device_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=self._config.keepalive_s,
            timeout=10,
            tls_context=tls_context,
            will=aiomqtt.Will(
                self._topic(TopicKind.STATE), self._state(DeviceState.OFFLINE), qos=1, retain=True
            ),
        )

    async def run(self) -> None:
        """Connect, serve ``desired`` messages and reconnect until closed."""
        while not self._closing:
            try:
                async with self._make_client() as client:
                    self._client = client
                    await self._on_connect(client)
                    async for message in client.messages:
                        await self._dispatch(message)
            except aiomqtt.MqttError as exc:
                reason = str(exc)
            else:
                reason = "message stream ended"
            finally:
                self._client = None
                self.connected.clear()
            if self._closing:
                break
            delay = self.backoff.next_delay()
            log.warning("MQTT link down (%s); reconnecting in %.1f s", reason, delay)
            await asyncio.sleep(delay)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        await client.publish(self._topic(TopicKind.STATE), self._state(DeviceState.ONLINE),
                             qos=1, retain=True)
        await client.publish(self._topic(TopicKind.HELLO), self._hello(), qos=1, retain=True)
        await client.subscribe(self._topic(TopicKind.DESIRED), qos=1)
        self.connects += 1
        self.backoff.reset()
        self.connected.set()
        log.info("connected to %s as %s", self._config.broker_url, self._config.device_id)
        if self._on_connected is not None:
            await self._on_connected()

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        if self._on_desired is None or not isinstance(message.payload, bytes | bytearray):
            return
        try:
            await self._on_desired(bytes(message.payload))
        except Exception:
            # A bad assignment must never take the link (and the device) down;
            # the handler reports rejections itself.
            log.exception("handling desired message failed")

    async def publish(self, kind: TopicKind, payload: bytes, retain: bool = False) -> bool:
        """Publish on this device's ``kind`` topic; False if offline or it failed."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            await client.publish(self._topic(kind), payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("publish on %s failed: %s", kind.value, exc)
            return False
        return True

    async def publish_hello(self) -> bool:
        """Re-send the retained capability report (e.g. after the active model changed)."""
        return await self.publish(TopicKind.HELLO, self._hello(), retain=True)

    async def close(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` and disconnect cleanly; stop reconnecting."""
        self._closing = True
        client = self._client
        # Not waiting for ``connected``: a stop that lands while _on_connect is
        # still subscribing would otherwise leave the retained ``online`` behind
        # (a clean disconnect suppresses the Last Will). QoS 1 on one session
        # keeps this after the ``online`` published first.
        if client is not None:
            try:
                await asyncio.wait_for(
                    client.publish(self._topic(TopicKind.STATE), self._state(DeviceState.OFFLINE),
                                   qos=1, retain=True),
                    timeout,
                )
            except (aiomqtt.MqttError, TimeoutError) as exc:
                log.warning("could not publish offline state: %s", exc)
