"""The MQTT v5 packets the ingest's subscription sends and reads, as bytes.

Pure functions and one incremental frame splitter, no sockets: the
connection loop (:mod:`.connection`) does the I/O around them. Only what a
QoS 1 subscriber needs is here: CONNECT §3.1, CONNACK §3.2, PUBLISH §3.3,
PUBACK §3.4, SUBSCRIBE §3.8, SUBACK §3.9, PINGREQ/PINGRESP §3.12-3.13,
DISCONNECT §3.14 (MQTT v5.0, OASIS, 2019). ``fleetsim/wire.py`` speaks the
publishing side of the same wire for the simulator; the encodings both
share (:func:`varint`, :func:`utf8_string`, :func:`packet`,
:func:`read_varint`) are :mod:`protocol.mqtt_codec`'s, re-exported here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.mqtt_codec import MalformedStream, packet, read_varint, utf8_string, varint

#: packet types (high nibble of the fixed header's first byte)
CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 9, 13, 14
PINGREQ_PACKET = b"\xc0\x00"
#: normal disconnection; the reason code may be left out (§3.14.2.1)
DISCONNECT_PACKET = b"\xe0\x00"
#: CONNECT properties (§3.1.2.11)
_SESSION_EXPIRY, _RECEIVE_MAXIMUM = 0x11, 0x21
#: SUBSCRIBE options: QoS 1, retained messages only for a new subscription (§3.8.3.1)
SUBSCRIBE_QOS1_RETAIN_IF_NEW = 0x01 | (1 << 4)
_PUBACK = struct.Struct("!BBH")

#: reason codes a CONNACK may carry, named for logs and errors (§3.2.2.2)
REASON_NAMES = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x97: "quota exceeded",
}
#: CONNACK reasons that mean our credentials or authorisation, not the network
AUTH_REFUSALS = frozenset({0x86, 0x87, 0x8C})


class MalformedPacket(ValueError):
    """One packet's fields do not parse; the packets around it are unaffected."""


def connect_packet(
    client_id: str,
    username: str | None,
    password: str | None,
    *,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int = 0,
    receive_maximum: int = 65535,
) -> bytes:
    """CONNECT, MQTT v5, with the session and credentials the ingest uses."""
    flags = 0x02 if clean_start else 0x00
    payload = utf8_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += utf8_string(username)
    if password is not None:
        flags |= 0x40
        payload += utf8_string(password)
    props = struct.pack("!BH", _RECEIVE_MAXIMUM, receive_maximum)
    if session_expiry_s:
        props += struct.pack("!BI", _SESSION_EXPIRY, session_expiry_s)
    header = utf8_string("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive_s)
    return packet(0x10, header + varint(len(props)) + props + payload)


def subscribe_packet(packet_id: int, topics: Sequence[str], options: int) -> bytes:
    """SUBSCRIBE to ``topics``, each with the same subscription options byte."""
    body = struct.pack("!H", packet_id) + b"\x00"  # no properties
    for topic in topics:
        body += utf8_string(topic) + bytes([options])
    return packet(0x82, body)


def pubacks(packet_ids: Sequence[int]) -> bytes:
    """PUBACKs (success, no properties: four bytes each) for a whole read, to send at once."""
    pack = _PUBACK.pack
    return b"".join([pack(0x40, 2, packet_id) for packet_id in packet_ids])


@dataclass(frozen=True, slots=True)
class Connack:
    """What the broker said to our CONNECT."""

    reason: int
    session_present: bool

    @property
    def refused(self) -> bool:
        """The broker refused the connection."""
        return self.reason >= 0x80

    def describe(self) -> str:
        """The reason code by name and number."""
        name = REASON_NAMES.get(self.reason, "refused")
        return f"{name} (0x{self.reason:02x})"


def parse_connack(body: bytes) -> Connack:
    """CONNACK's acknowledge flags and reason code; properties are not needed."""
    if len(body) < 2:
        raise MalformedPacket("CONNACK shorter than two bytes")
    return Connack(reason=body[1], session_present=bool(body[0] & 0x01))


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    """(packet id, one reason code per topic) of a SUBACK."""
    if len(body) < 3:
        raise MalformedPacket("SUBACK shorter than three bytes")
    parsed = read_varint(body, 2, len(body))
    if parsed is None or parsed[0] + parsed[1] > len(body):
        raise MalformedPacket("SUBACK properties run past the packet")
    return struct.unpack_from("!H", body)[0], list(body[parsed[0] + parsed[1]:])


def _publish_id(flags: int, body: bytes | memoryview) -> int | None:
    """The packet id of a QoS 1 or 2 PUBLISH (read from its head alone), or None."""
    if not flags & 0x06 or len(body) < 2:
        return None
    topic_end = 2 + struct.unpack_from("!H", body)[0]
    if topic_end + 2 > len(body):
        return None
    return struct.unpack_from("!H", body, topic_end)[0]


def parse_publish(flags: int, body: bytes) -> tuple[str, int | None, bytes, bool]:
    """(topic, packet id or None for QoS 0, payload, retain) of one PUBLISH.

    Raises :class:`MalformedPacket`; the packet id is then still on the
    exception (``packet_id``), so the broker can be told the packet was taken.
    """
    packet_id = _publish_id(flags, body)
    try:
        if len(body) < 2:
            raise MalformedPacket("PUBLISH without a topic length")
        at = 2 + struct.unpack_from("!H", body)[0]
        if at > len(body):
            raise MalformedPacket("PUBLISH topic runs past the packet")
        topic = body[2:at].decode("utf-8")
        if flags & 0x06:
            if packet_id is None:
                raise MalformedPacket("PUBLISH without its packet id")
            at += 2
        parsed = read_varint(body, at, len(body))
        if parsed is None or parsed[0] + parsed[1] > len(body):
            raise MalformedPacket("PUBLISH properties run past the packet")
        payload = body[parsed[0] + parsed[1]:]
    except (MalformedPacket, MalformedStream, UnicodeDecodeError) as exc:
        error = exc if isinstance(exc, MalformedPacket) else MalformedPacket(str(exc))
        error.packet_id = packet_id  # type: ignore[attr-defined]
        raise error from None
    return topic, packet_id, payload, bool(flags & 0x01)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A packet over the size cap, discarded unread; its id when it could be read."""

    first: int
    packet_id: int | None


class FrameReader:
    """Split a byte stream from the broker into packets, many per read.

    The caller receives into :meth:`space` (a preallocated buffer, so one
    ``recv_into`` can take hundreds of packets), reports the byte count to
    :meth:`advance`, then takes every complete packet with :meth:`frames`; a
    packet cut by the end of a read stays for the next. A packet longer than
    ``max_packet`` is skipped as it streams past, never held in memory.
    """

    def __init__(self, max_packet: int, size: int = 256 * 1024) -> None:
        if size < 16:
            raise ValueError("buffer too small")
        self.max_packet = max_packet
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._filled = 0
        #: bytes of an oversized packet still to discard as they arrive
        self._skip = 0
        #: packets split off already, returned first by the next :meth:`frames`
        self._held: list[tuple[int, bytes] | Skipped] = []

    def push_back(self, frames: list[tuple[int, bytes] | Skipped]) -> None:
        """Keep ``frames`` (split off already) for the next :meth:`frames` call."""
        self._held = frames + self._held

    def space(self) -> memoryview:
        """Where the next read should land (grows to hold a packet longer than the buffer)."""
        if self._filled == len(self._buffer):
            self._view.release()
            self._buffer.extend(bytes(len(self._buffer)))
            self._view = memoryview(self._buffer)
        return self._view[self._filled:]

    def advance(self, count: int) -> None:
        """``count`` bytes were written at the start of :meth:`space`."""
        start = self._filled
        if self._skip:
            dropped = min(self._skip, count)
            self._skip -= dropped
            kept = self._buffer[start + dropped:start + count]
            self._buffer[start:start + len(kept)] = kept
            count -= dropped
        self._filled = start + count

    def frames(self) -> list[tuple[int, bytes] | Skipped]:
        """Every complete packet received so far: (first byte, body), or :class:`Skipped`.

        Raises :class:`MalformedStream` when the stream cannot be split.
        """
        out, self._held = self._held, []
        data, end, at = self._view, self._filled, 0
        while at < end:
            parsed = read_varint(data, at + 1, end)
            if parsed is None:
                break
            length, body_at = parsed
            first = data[at]
            if length > self.max_packet:
                out.append(Skipped(first, _publish_id(first & 0x0F, data[body_at:end])
                                   if first >> 4 == PUBLISH else None))
                have = end - body_at
                if have >= length:
                    at = body_at + length
                    continue
                self._skip = length - have
                at = end
                break
            if body_at + length > end:
                break
            out.append((first, bytes(data[body_at:body_at + length])))
            at = body_at + length
        if at:
            self._buffer[:end - at] = self._buffer[at:end]
            self._filled = end - at
        return out
