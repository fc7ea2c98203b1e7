"""MQTT v5 primitives both ends of slmfleet's own MQTT code share, as bytes.

The control plane's ingest (``controlplane/ingest/wire.py``) reads the wire
as a QoS 1 subscriber, the fleet simulator (``fleetsim/wire.py``) writes it
as a publisher; the encodings under every packet are the same: the variable
byte integer (§1.5.5), the UTF-8 string (§1.5.4) and the fixed header
(§2.1) of MQTT v5.0 (OASIS, 2019). Pure functions, no sockets.
"""

from __future__ import annotations

import struct

__all__ = ["MalformedStream", "packet", "read_varint", "utf8_string", "varint"]

#: a remaining length is at most four bytes (§1.5.5)
MAX_VARINT_BYTES = 4


class MalformedStream(ValueError):
    """The bytes from the broker cannot be split into packets; the connection must close."""


def varint(n: int) -> bytes:
    """MQTT variable byte integer (§1.5.5)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8_string(text: str) -> bytes:
    """MQTT UTF-8 string: two-byte length, then the bytes (§1.5.4)."""
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def packet(first: int, body: bytes) -> bytes:
    """A control packet: first byte, remaining length, body (§2.1)."""
    return bytes([first]) + varint(len(body)) + body


def read_varint(data: bytes | bytearray | memoryview, at: int,
                end: int | None = None) -> tuple[int, int] | None:
    """(value, offset after it) of the integer at ``at``, or None when the bytes end first.

    Raises :class:`MalformedStream` for an integer longer than four bytes.
    """
    stop = len(data) if end is None else end
    value, shift = 0, 0
    for _ in range(MAX_VARINT_BYTES):
        if at >= stop:
            return None
        byte = data[at]
        value += (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    raise MalformedStream("remaining length longer than four bytes")
