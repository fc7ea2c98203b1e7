"""A minimal MQTT v5 publisher for the simulator's heartbeats: QoS 1, no thread.

paho costs the simulator more than its devices do at thousands of
heartbeats a second: every ``publish`` from the timer thread wakes paho's
network thread through a socket pair, and every PUBACK walks paho's window
of unacknowledged messages. Heartbeats need neither: they are fire and
count. :class:`HeartbeatLink` writes PUBLISH packets into a buffer that the
simulator's one thread sends with one ``send`` per tick, and reads PUBACKs
back in bulk, only to count them and to stay within the broker's Receive
Maximum (MQTT v5 §3.3.4: a client must not have more unacknowledged QoS 1
messages than the server allows). Everything else a device does (hello,
state, events, receiving ``desired``) stays on paho.

Wire format per MQTT v5.0 (OASIS, 2019): CONNECT §3.1, CONNACK §3.2,
PUBLISH §3.3, PUBACK §3.4, PINGREQ §3.12, DISCONNECT §3.14.
"""

from __future__ import annotations

import socket
import struct
import time

from protocol.mqtt_codec import packet, read_varint, utf8_string, varint

#: packet type nibbles (high 4 bits of the fixed header)
CONNACK, PUBLISH_QOS1, PUBACK, PINGRESP, DISCONNECT = 0x20, 0x32, 0x40, 0xD0, 0xE0
#: CONNACK property: the most unacknowledged QoS 1 PUBLISHes the broker accepts
RECEIVE_MAXIMUM = 0x21
KEEPALIVE_S = 60
#: the timer thread flushes at least this often, so PINGREQ is rarely needed
_PING_AFTER_S = KEEPALIVE_S / 2


class LinkError(ConnectionError):
    """The broker refused the connection or closed it."""


#: the Remaining Length field of every packet a heartbeat makes, encoded once
_VARINTS = [varint(n) for n in range(16_384)]
_PACKET_IDS = [n.to_bytes(2, "big") + b"\x00" for n in range(65_536)]  # id, no properties


def topic_head(topic: bytes) -> bytes:
    """A PUBLISH's topic name field (length and UTF-8 bytes), built once per device."""
    return struct.pack("!H", len(topic)) + topic


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    """CONNECT, MQTT v5, clean start, user name and password, no properties."""
    flags = 0x80 | 0x40 | 0x02  # user name, password, clean start
    header = utf8_string("MQTT") + bytes([5, flags]) + struct.pack("!H", KEEPALIVE_S) + b"\x00"
    payload = utf8_string(client_id) + utf8_string(username) + utf8_string(password)
    return packet(0x10, header + payload)


#: fixed widths of MQTT v5 properties by identifier (§2.2.2.2); others are strings
_WIDTH = {**dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
          **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
          **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4)}
_STRING_PAIR = 0x26
_VARINT = 0x0B


def _connack_receive_maximum(body: bytes) -> int:
    """The Receive Maximum a CONNACK body grants (65,535 when absent, §3.2.2.3.3)."""
    if len(body) < 2 or body[1] != 0:
        raise LinkError(f"broker refused the connection (reason code {body[1:2].hex()})")
    parsed = read_varint(body, 2)
    if parsed is None:
        return 65535
    length, at = parsed
    end = at + length
    while at < end:
        prop, at = body[at], at + 1
        if prop == RECEIVE_MAXIMUM:
            return struct.unpack_from("!H", body, at)[0]
        if prop in _WIDTH:
            at += _WIDTH[prop]
        elif prop == _VARINT:
            found = read_varint(body, at)
            at = found[1] if found else end
        else:  # UTF-8 string or binary data: two-byte length first; a pair is two
            for _ in range(2 if prop == _STRING_PAIR else 1):
                at += 2 + struct.unpack_from("!H", body, at)[0]
    return 65535


class HeartbeatLink:
    """One MQTT connection that publishes QoS 1 messages from the caller's thread."""

    def __init__(self, host: str, port: int, client_id: str, username: str,
                 password: str, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(connect_packet(client_id, username, password))
        first, body = self._read_packet_blocking()
        if first & 0xF0 != CONNACK:
            raise LinkError(f"expected CONNACK, got packet type {first >> 4}")
        self.receive_maximum = _connack_receive_maximum(body)
        self._sock.setblocking(False)
        self._out = bytearray()
        self._in = bytearray()
        self._next_id = 1
        self.inflight = 0
        self.acked = 0
        self.published = 0
        self._last_send = time.monotonic()

    def _read_packet_blocking(self) -> tuple[int, bytes]:
        data = b""
        while True:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise LinkError("broker closed the connection during CONNECT")
            data += chunk
            parsed = read_varint(data, 1)
            if parsed is not None and len(data) >= parsed[1] + parsed[0]:
                return data[0], data[parsed[1]:parsed[1] + parsed[0]]

    @property
    def can_publish(self) -> bool:
        """Whether one more QoS 1 message stays within the broker's Receive Maximum."""
        return self.inflight < self.receive_maximum

    def publish(self, topic: bytes, payload: bytes) -> None:
        """Queue one QoS 1 PUBLISH (``topic`` already UTF-8); sent at the next :meth:`flush`."""
        self.publish_head(topic_head(topic), payload)

    def publish_head(self, head: bytes, payload: bytes) -> None:
        """:meth:`publish` with the topic field from :func:`topic_head`: all but the
        payload, the packet id and the length comes ready-made."""
        packet_id = self._next_id
        self._next_id = packet_id % 65535 + 1
        body_len = len(head) + 3 + len(payload)  # topic, packet id, no properties
        out = self._out
        out.append(PUBLISH_QOS1)
        out += _VARINTS[body_len] if body_len < 16_384 else varint(body_len)
        out += head
        out += _PACKET_IDS[packet_id]
        out += payload
        self.inflight += 1
        self.published += 1

    def flush(self) -> None:
        """Send what is queued (as much as the socket takes now) and read acknowledgements."""
        if not self._out and time.monotonic() - self._last_send > _PING_AFTER_S:
            self._out += b"\xc0\x00"  # PINGREQ
        if self._out:
            try:
                sent = self._sock.send(self._out)
            except BlockingIOError:
                sent = 0
            del self._out[:sent]
            self._last_send = time.monotonic()
        self._read_acks()

    def _read_acks(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise LinkError("broker closed the heartbeat connection")
            self._in += chunk
        data, at = self._in, 0
        while True:
            parsed = read_varint(data, at + 1) if at < len(data) else None
            if parsed is None or parsed[1] + parsed[0] > len(data):
                break
            first = data[at]
            if first & 0xF0 == PUBACK:
                self.inflight -= 1
                self.acked += 1
            elif first & 0xF0 == DISCONNECT:
                raise LinkError("broker sent DISCONNECT on the heartbeat connection")
            at = parsed[1] + parsed[0]
        del data[:at]

    @property
    def pending_bytes(self) -> int:
        """Bytes queued but not yet taken by the socket."""
        return len(self._out)

    def close(self) -> None:
        """Send what is left, then DISCONNECT (normal) and close."""
        deadline = time.monotonic() + 5
        self._sock.setblocking(True)
        self._sock.settimeout(5)
        try:
            while self._out and time.monotonic() < deadline:
                sent = self._sock.send(self._out)
                del self._out[:sent]
            self._sock.sendall(bytes([DISCONNECT, 0]))
        except OSError:
            pass
        finally:
            self._sock.close()
