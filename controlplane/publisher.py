"""Puts each device's current assignment, retained, on its ``desired`` topic.

The database says what every device should have: ``device_sequences`` holds
the highest sequence issued to a device (``last_sequence``) and the one the
broker last acknowledged (``published_sequence``); ``desired_documents``
its current signed document. A device whose two numbers differ is owed a
message: that document, or an empty retained message (which clears
``desired``) when it has none.

One thread drains that backlog: read a batch in one statement, publish each
payload retained at QoS 1, wait for the PUBACKs, then record each
acknowledged number. It never reads ahead of the database, so it cannot
publish a stale assignment after a newer one: a newer one raises
``last_sequence`` past what gets recorded, and the device stays owed. A
broker that is down, or a PUBACK that never comes, just leaves the rows owed;
the thread retries on reconnect, whenever it is kicked (after each commit)
and every ``poll_s`` seconds. Nothing is lost while the database keeps the row.

A broker restarted without persistence forgets every retained message. To
notice, the publisher keeps a retained marker of its own on
:data:`MARKER_TOPIC` (under a device id no device can have, so no device can
read or write it). On every connect it subscribes to it; when the marker
does not come back, the broker's retained store is gone, and every live
assignment is marked owed again -- in the database, before the marker is
re-published, so a crash in between still leaves them owed.

One paho client with its own network thread (``loop_start``), like the
ingest's, and its own MQTT connection so a busy ingest never delays
assignments. Run one publisher per fleet (rollout leader) when several
control-plane replicas share a database.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine, bindparam, select, update

from protocol import TOPIC_ROOT, TopicKind, device_topic

from .config import ControlPlaneSettings
from .db.models import DesiredDocument, DeviceSequence
from .logs import RateLimitedLog

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10
#: payloads published before waiting for their PUBACKs
BATCH = 1000
PUBACK_TIMEOUT_S = 10.0
POLL_S = 5.0
#: retained by this publisher; its absence means the broker lost its retained store.
#: '_' cannot start a device id, so this level is no device's.
MARKER_TOPIC = f"{TOPIC_ROOT}/_cp/desired-marker"
#: how long to wait for the marker after the SUBACK before concluding it is gone
#: (brokers send retained messages right behind the SUBACK); a marker that comes
#: later only costs one needless re-publish
MARKER_WAIT_S = 0.25
SUBACK_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class _Owed:
    device_id: str
    sequence: int
    payload: bytes


class DesiredPublisher:
    """Publish owed ``desired`` messages until the broker acknowledges them."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        engine: Engine,
        *,
        poll_s: float = POLL_S,
        puback_timeout_s: float = PUBACK_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._poll_s = poll_s
        self._puback_timeout_s = puback_timeout_s
        #: QoS 1 publishes sent before waiting for their PUBACKs (see _on_connect)
        self._window = BATCH
        self._log = RateLimitedLog(log)
        self._kick = threading.Event()
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._cond = threading.Condition()
        self._acks: dict[int, ReasonCode] = {}
        #: the PUBACKs the drain thread still waits for
        self._missing: set[int] = set()
        self._marker_seen = threading.Event()
        self._marker_subscribed = threading.Event()
        #: bumped on every CONNACK; the drain thread checks the marker once per connection
        self._connection = 0
        self._checked_connection = 0
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self.published = 0

    @property
    def window(self) -> int:
        """QoS 1 publishes sent before waiting for their acknowledgements."""
        return self._window

    @property
    def connected(self) -> bool:
        """True while the publisher's MQTT connection is up."""
        return self._connected.is_set()

    @property
    def connections(self) -> int:
        """How many times the broker accepted the publisher's connection (1 + reconnects)."""
        return self._connection

    def start(self) -> DesiredPublisher:
        """Connect in the background and start draining."""
        if self._client is not None:
            raise RuntimeError("DesiredPublisher already started")
        settings = self._settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"slmfleet-cp-desired-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        password = settings.mqtt_password
        client.username_pw_set(
            settings.mqtt_username, password.get_secret_value() if password else None
        )
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        # paho's own window off (0): past it paho walks every unacknowledged
        # message on each PUBACK, quadratic in the window. drain_once keeps the
        # window instead, at the broker's Receive Maximum (its CONNACK says).
        client.max_inflight_messages_set(0)
        tls = settings.mqtt_tls_context()
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        client.connect_async(settings.mqtt_host, settings.mqtt_port, keepalive=KEEPALIVE_S)
        client.loop_start()
        self._thread = threading.Thread(target=self._run, name="desired-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop draining and disconnect. Idempotent; owed rows stay owed."""
        self._closing.set()
        self._kick.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self._puback_timeout_s + 5)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def kick(self) -> None:
        """Look for owed messages now (call after committing an assignment)."""
        self._kick.set()

    # -- paho callbacks (network thread) ---------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._log.log(
                logging.ERROR, "connect", "broker refused the publisher: %s", reason_code
            )
            return
        self._marker_seen.clear()
        self._marker_subscribed.clear()
        self._connection += 1
        # MQTT v5: at most this many QoS 1 publishes unacknowledged (65,535 if unsaid).
        receive_maximum = getattr(properties, "ReceiveMaximum", None) or BATCH
        self._window = max(1, min(BATCH, int(receive_maximum)))
        client.subscribe(MARKER_TOPIC, qos=1)
        self._connected.set()
        self._kick.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        with self._cond:
            self._cond.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            # Wake the drain thread once its whole batch is in, not per PUBACK:
            # a thousand wake-ups per batch cost more than the batch itself.
            self._missing.discard(mid)
            if not self._missing:
                self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        # The only subscription this client makes is the marker's.
        self._marker_subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == MARKER_TOPIC and msg.payload:
            self._marker_seen.set()

    # -- draining (publisher thread) ---------------------------------------------

    def _check_marker(self) -> None:
        """Once per connection: re-owe every live assignment if the broker forgot them."""
        connection = self._connection
        if connection == self._checked_connection:
            return
        self._marker_subscribed.wait(SUBACK_TIMEOUT_S)
        if self._marker_seen.wait(MARKER_WAIT_S):
            self._checked_connection = connection
            return
        seq = DeviceSequence.__table__
        doc = DesiredDocument.__table__
        with self._engine.begin() as conn:
            owed = conn.execute(
                update(seq)
                .where(seq.c.device_id.in_(
                    select(doc.c.device_id).where(doc.c.envelope.is_not(None))))
                .values(published_sequence=0)
            ).rowcount
        if owed:
            log.warning(
                "the broker has no retained marker (restarted without persistence?); "
                "re-publishing %d live assignment(s)",
                owed,
            )
        client = self._client
        if client is None:
            return
        info = client.publish(MARKER_TOPIC, f'{{"ts":{time.time()}}}', qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS and self._await_acks([info.mid]):
            self._checked_connection = connection

    def _run(self) -> None:
        while not self._closing.is_set():
            self._kick.wait(self._poll_s)
            self._kick.clear()
            if self._closing.is_set() or not self.connected:
                continue
            try:
                self._check_marker()
                while self.connected and not self._closing.is_set() and self.drain_once():
                    pass
            except Exception as exc:
                # The thread must outlive a failed batch (say, a database
                # hiccup): the rows stay owed and the next pass retries them.
                self._log.log(
                    logging.ERROR, "drain", "publishing assignments failed", exc_info=exc
                )

    def _owed(self) -> list[_Owed]:
        seq = DeviceSequence.__table__
        doc = DesiredDocument.__table__
        # Two statements, counters first: an outer join of the two tables
        # sorted by device made SQLite walk the documents for every owed row.
        # A document committed in between only makes the envelope newer than
        # the number recorded for it, which leaves the device owed and
        # re-published next pass; never the other way round.
        with self._engine.connect() as conn:
            owed = conn.execute(
                select(seq.c.device_id, seq.c.last_sequence)
                .where(seq.c.published_sequence != seq.c.last_sequence)
                .order_by(seq.c.device_id)
                .limit(BATCH)
            ).all()
            if not owed:
                return []
            envelopes = dict(conn.execute(
                select(doc.c.device_id, doc.c.envelope)
                .where(doc.c.device_id.in_([device_id for device_id, _ in owed]))
            ).all())
        return [
            _Owed(device_id, int(last),
                  envelopes[device_id].encode("utf-8") if envelopes.get(device_id) else b"")
            for device_id, last in owed
        ]

    def drain_once(self) -> bool:
        """Publish one batch of owed messages; return True if all were acknowledged."""
        client = self._client
        owed = self._owed()
        if client is None or not owed:
            return False
        sent: list[tuple[_Owed, int]] = []
        acked: dict[int, ReasonCode] = {}
        window = self._window
        for start in range(0, len(owed), window):
            mids = []
            for item in owed[start : start + window]:
                info = client.publish(device_topic(item.device_id, TopicKind.DESIRED),
                                      item.payload, qos=1, retain=True)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # disconnected meanwhile; the rest stay owed
                sent.append((item, info.mid))
                mids.append(info.mid)
            acked.update(self._await_acks(mids))
            if len(mids) < len(owed[start : start + window]) or len(acked) < len(sent):
                break  # the link failed or the broker went quiet: the rest wait
        done = []
        for item, mid in sent:
            code = acked.get(mid)
            if code is None:
                continue
            if code.is_failure:
                self._log.log(
                    logging.ERROR,
                    f"refused:{code}",
                    "broker refused desired for %s: %s",
                    item.device_id,
                    code,
                )
                continue
            done.append({"d": item.device_id, "s": item.sequence})
        if done:
            seq = DeviceSequence.__table__
            # Not "max": if another writer published something newer after us,
            # recording our older number leaves the device owed, and the next
            # pass publishes the newest again.
            with self._engine.begin() as conn:
                conn.execute(
                    update(seq)
                    .where(seq.c.device_id == bindparam("d"))
                    .values(published_sequence=bindparam("s")),
                    done,
                )
            self.published += len(done)
        return len(done) == len(owed)

    def _await_acks(self, mids: list[int]) -> dict[int, ReasonCode]:
        deadline = time.monotonic() + self._puback_timeout_s
        wanted = set(mids)
        with self._cond:
            self._missing = wanted - self._acks.keys()
            while self._missing:
                left = deadline - time.monotonic()
                if left <= 0 or not self.connected:
                    break
                self._cond.wait(left)
            self._missing = set()
            return {mid: self._acks.pop(mid) for mid in list(wanted) if mid in self._acks}
