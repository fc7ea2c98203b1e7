"""The ingest's MQTT connection: one socket, read and acknowledged in bulk.

A general MQTT client reads each packet in several ``recv`` calls and
answers each QoS 1 PUBLISH with a ``send`` of its own: six system calls
per heartbeat when a held fleet's messages arrive one by one. This loop
instead lets messages gather in the kernel for up to ``flush_s``, takes
everything there with one ``recv_into`` into a large buffer, splits it
into packets (:class:`.wire.FrameReader`), hands the batch to the writer
and then acknowledges the whole batch with one ``sendall``.

Acknowledging only after the hand-off is the backpressure: while the
writer is behind, the hand-off blocks, nothing more is read or
acknowledged, the kernel's buffers fill and the broker holds the rest
(and, with a persistent session, delivers it again after a reconnect).
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..logs import RateLimitedLog
from . import wire
from .writer_process import RawMessage

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0
#: a packet longer than this is skipped unread (the broker's own cap is 1 MiB)
MAX_PACKET_BYTES = 1024 * 1024
_SUBSCRIBE_ID = 1
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BrokerRefused(ConnectionRefusedError):
    """The broker answered CONNECT with a refusal (already reported when raised)."""


class BrokerClosed(ConnectionError):
    """The broker closed the connection, sent DISCONNECT or stopped answering."""


@dataclass(frozen=True)
class LinkConfig:
    """Where to connect, as whom, and what to subscribe to."""

    host: str
    port: int
    client_id: str
    username: str | None
    password: str | None
    topics: Sequence[str]
    clean_start: bool
    session_expiry_s: int
    flush_s: float
    batch_max: int
    tls: ssl.SSLContext | None = None
    keepalive_s: int = KEEPALIVE_S


@dataclass
class LinkEvents:
    """What the loop tells its owner; each is called on the loop's thread."""

    #: the batch read since the last call; returns once the writer has it
    hand_off: Callable[[list[RawMessage]], None]
    #: subscribed (True) or the connection lost (False)
    subscribed: Callable[[bool], None]
    #: the broker refused our login: a message naming the fix
    refused: Callable[[str], None]
    #: a packet from the broker that could not be read: "malformed" or "too_large"
    rejected: Callable[[str], None]


class BulkLink:
    """The connection loop on a thread of its own; reconnects with backoff until stopped."""

    def __init__(self, config: LinkConfig, events: LinkEvents) -> None:
        self._config = config
        self._events = events
        self._log = RateLimitedLog(log)
        self._closing = threading.Event()
        self._hurry = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        #: PUBLISH packets read since start (counted as they are parsed)
        self.received = 0
        #: read but not yet handed to the writer
        self.pending = 0

    def start(self) -> None:
        """Connect and serve on a new thread."""
        self._thread = threading.Thread(target=self._run, name="ingest-mqtt", daemon=True)
        self._thread.start()

    def hurry(self) -> None:
        """Hand what is pending to the writer now rather than at its flush time."""
        if self.pending:
            self._hurry = True
            self._wake()

    def stop(self, timeout: float) -> None:
        """Hand off what was read, acknowledge it, disconnect and end the thread."""
        self._closing.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        # full (already woken) or closed (stopped): either way nothing to do
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\x00")

    # -- connecting -------------------------------------------------------------

    def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        while not self._closing.is_set():
            try:
                sock, reader = self._open()
            except BrokerRefused:
                pass
            except (OSError, wire.MalformedStream, wire.MalformedPacket) as exc:
                self._log.log(logging.WARNING, "connect", "MQTT connect to %s:%s failed: %s",
                              self._config.host, self._config.port, exc)
            else:
                try:
                    self._serve(sock, reader)
                    backoff = RECONNECT_MIN_S
                except (OSError, wire.MalformedStream) as exc:
                    if not self._closing.is_set():
                        self._log.log(logging.WARNING, "disconnect",
                                      "MQTT connection lost (%s); reconnecting", exc)
                    # A connection that served a while starts the backoff over.
                    backoff = RECONNECT_MIN_S
                finally:
                    self._events.subscribed(False)
                    sock.close()
            if self._closing.wait(backoff):
                return
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _open(self) -> tuple[socket.socket, wire.FrameReader]:
        """TCP (and TLS), CONNECT, CONNACK, SUBSCRIBE; the SUBACK is read by the loop."""
        config = self._config
        sock = socket.create_connection((config.host, config.port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if config.tls is not None:
                sock = config.tls.wrap_socket(sock, server_hostname=config.host)
            sock.sendall(wire.connect_packet(
                config.client_id, config.username, config.password,
                keepalive_s=config.keepalive_s, clean_start=config.clean_start,
                session_expiry_s=config.session_expiry_s,
            ))
            reader = wire.FrameReader(MAX_PACKET_BYTES)
            connack = self._read_connack(sock, reader)
            if connack.refused:
                self._refused(connack)
            sock.sendall(wire.subscribe_packet(
                _SUBSCRIBE_ID, config.topics, wire.SUBSCRIBE_QOS1_RETAIN_IF_NEW
            ))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        log.info("connected to %s:%s; subscribing", config.host, config.port)
        return sock, reader

    def _read_connack(self, sock: socket.socket, reader: wire.FrameReader) -> wire.Connack:
        while True:
            count = sock.recv_into(reader.space())
            if not count:
                raise BrokerClosed("broker closed the connection before CONNACK")
            reader.advance(count)
            # What follows CONNACK in the same read (a resumed session's
            # queue) stays in the reader for the loop.
            frames = reader.frames()
            if frames:
                first = frames[0]
                if isinstance(first, wire.Skipped) or first[0] >> 4 != wire.CONNACK:
                    raise wire.MalformedStream("the broker's first packet is not CONNACK")
                reader.push_back(frames[1:])
                return wire.parse_connack(first[1])

    def _refused(self, connack: wire.Connack) -> None:
        if connack.reason in wire.AUTH_REFUSALS:
            message = (
                f"broker refused the control plane's login: {connack.describe()}; check "
                "mqtt_username and mqtt_password (SLMFLEET_MQTT_USERNAME, "
                "SLMFLEET_MQTT_PASSWORD) against the broker's password file and ACL"
            )
            self._events.refused(message)
            raise BrokerRefused(message)
        message = f"broker refused the connection: {connack.describe()}"
        self._log.log(logging.ERROR, "refused", "%s", message)
        raise BrokerRefused(message)

    # -- serving ----------------------------------------------------------------

    def _serve(self, sock: socket.socket, reader: wire.FrameReader) -> None:
        """Read, hand off and acknowledge until the connection ends or we stop."""
        batch = _Batch()
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        keepalive = self._config.keepalive_s
        last_sent = last_heard = time.monotonic()
        try:
            while True:
                self._take(reader.frames(), batch, sock)
                now = time.monotonic()
                closing = self._closing.is_set()
                if batch.messages and (closing or self._hurry or batch.due(now, self._config)):
                    self._hurry = False
                    self._hand_off(batch, sock)
                    last_sent = now
                if closing:
                    _send_all(sock, wire.DISCONNECT_PACKET)
                    return
                if now - last_sent >= keepalive / 2:
                    _send_all(sock, wire.PINGREQ_PACKET)
                    last_sent = now
                if now - last_heard > keepalive * 1.5:
                    raise BrokerClosed(f"nothing from the broker for {keepalive * 1.5:.0f} s")
                if batch.ids and not batch.messages:
                    self._hand_off(batch, sock)  # acknowledgements of refused packets
                if batch.busy:
                    pass  # the last read filled the buffer: read again at once
                elif batch.messages:
                    # Let a held fleet's messages gather in the kernel until the
                    # batch is due: one read then takes them all.
                    self._sleep(batch.since + self._config.flush_s - now)
                else:
                    ready = selector.select(max(last_sent + keepalive / 2 - now, 0.0))
                    if any(key.fileobj is self._wake_r for key, _ in ready):
                        self._drain_wake()
                        continue
                    if not ready:
                        continue
                if self._read(sock, reader, batch):
                    last_heard = time.monotonic()
        finally:
            selector.close()
            if batch.messages:
                # Read but not acknowledged: hand them to the writer anyway; the
                # broker may deliver them again, and writes are idempotent.
                self._events.hand_off(batch.messages)
                batch.clear()
                self.pending = 0

    def _sleep(self, timeout: float) -> None:
        """Wait ``timeout`` unless woken (stop, hurry)."""
        if timeout > 0 and select.select([self._wake_r], [], [], timeout)[0]:
            self._drain_wake()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _read(self, sock: socket.socket, reader: wire.FrameReader, batch: _Batch) -> bool:
        """Take what the socket holds now; True when bytes came."""
        batch.busy = False
        got = False
        while True:
            space = reader.space()
            wanted = len(space)
            try:
                count = sock.recv_into(space)
            except _WOULD_BLOCK:
                break
            finally:
                space.release()
            if not count:
                raise BrokerClosed("broker closed the connection")
            got = True
            reader.advance(count)
            if count == wanted:
                # The buffer filled: more is waiting; parse to make room, and
                # do not sleep before the next read.
                batch.busy = True
                self._take(reader.frames(), batch, sock)
                if len(batch.messages) >= self._config.batch_max:
                    break
                continue
            if not isinstance(sock, ssl.SSLSocket):
                break  # a short read took all the kernel had
        return got

    def _take(self, frames: list[tuple[int, bytes] | wire.Skipped], batch: _Batch,
              sock: socket.socket) -> None:
        """Sort the packets read: messages into the batch, the rest handled here."""
        if not frames:
            return
        received = time.time()
        for frame in frames:
            if isinstance(frame, wire.Skipped):
                self._events.rejected("too_large")
                self._log.log(logging.WARNING, "too_large",
                              "skipped a packet over %d bytes from the broker", MAX_PACKET_BYTES)
                if frame.packet_id is not None:
                    batch.ack_only(frame.packet_id)
                continue
            first, body = frame
            kind = first >> 4
            if kind == wire.PUBLISH:
                try:
                    topic, packet_id, payload, retain = wire.parse_publish(first & 0x0F, body)
                except wire.MalformedPacket as exc:
                    self._events.rejected("malformed")
                    self._log.log(logging.WARNING, "malformed",
                                  "malformed PUBLISH from the broker: %s", exc)
                    bad_id = getattr(exc, "packet_id", None)
                    if bad_id is not None:
                        batch.ack_only(bad_id)
                    continue
                batch.add((topic, payload, retain, received), packet_id)
                self.received += 1
            elif kind == wire.SUBACK:
                self._subacked(body)
            elif kind == wire.DISCONNECT:
                reason = body[0] if body else 0
                raise BrokerClosed(f"broker sent DISCONNECT (reason 0x{reason:02x})")
            # PINGRESP and anything else: hearing from the broker is enough.
        self.pending = len(batch.messages)
        if batch.messages and len(batch.messages) >= self._config.batch_max:
            self._hand_off(batch, sock)

    def _subacked(self, body: bytes) -> None:
        _, reasons = wire.parse_suback(body)
        refused = [f"0x{r:02x}" for r in reasons if r >= 0x80]
        if refused:
            log.error("broker refused ingest subscriptions: %s", ", ".join(refused))
            return
        self._events.subscribed(True)

    def _hand_off(self, batch: _Batch, sock: socket.socket) -> None:
        """Give the batch to the writer, then acknowledge it in one send."""
        if batch.messages:
            # Blocks while the writer is behind: that is the backpressure.
            self._events.hand_off(batch.messages)
        acks = batch.ids
        batch.clear()
        self.pending = 0
        if acks:
            _send_all(sock, wire.pubacks(acks))


class _Batch:
    """Messages read and not yet handed off, with the packet ids to acknowledge after."""

    __slots__ = ("busy", "ids", "messages", "since")

    def __init__(self) -> None:
        self.messages: list[RawMessage] = []
        self.ids: list[int] = []
        self.since = 0.0
        #: the last read filled the buffer: read again at once
        self.busy = False

    def add(self, message: RawMessage, packet_id: int | None) -> None:
        if not self.messages:
            self.since = time.monotonic()
        self.messages.append(message)
        if packet_id is not None:
            self.ids.append(packet_id)

    def ack_only(self, packet_id: int) -> None:
        self.ids.append(packet_id)

    def due(self, now: float, config: LinkConfig) -> bool:
        return len(self.messages) >= config.batch_max or now - self.since >= config.flush_s

    def clear(self) -> None:
        # ``busy`` stays: a batch handed off in the middle of a read that
        # filled the buffer still leaves more to read at once.
        self.messages = []
        self.ids = []


def _send_all(sock: socket.socket, data: bytes, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """``sendall`` on a non-blocking socket (TLS included): wait for room, up to ``timeout``."""

    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        try:
            sent = sock.send(view)
        except _WOULD_BLOCK:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the broker is not reading our packets") from None
            select.select([], [sock], [], remaining)
            continue
        view = view[sent:]
