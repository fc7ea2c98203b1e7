"""The ingest's MQTT v5 codec: real packet bytes, split and joined as a socket would."""

from __future__ import annotations

import struct

import pytest

from controlplane.ingest import wire


def publish(topic: str, payload: bytes, packet_id: int | None = 1, retain: bool = False,
            properties: bytes = b"") -> bytes:
    """A PUBLISH as a broker sends it (QoS 1 with a packet id, QoS 0 without)."""
    body = struct.pack("!H", len(topic.encode())) + topic.encode()
    if packet_id is not None:
        body += struct.pack("!H", packet_id)
    body += wire.varint(len(properties)) + properties + payload
    first = 0x30 | (0x02 if packet_id is not None else 0) | (0x01 if retain else 0)
    return bytes([first]) + wire.varint(len(body)) + body


Frame = tuple[int, bytes] | wire.Skipped


def parse_all(reader: wire.FrameReader, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        while chunk:
            space = reader.space()
            count = min(len(space), len(chunk))
            space[:count] = chunk[:count]
            space.release()
            reader.advance(count)
            chunk = chunk[count:]
            out += reader.frames()
    return out


def test_one_read_holding_hundreds_of_packets_yields_every_one() -> None:
    stream = b"".join(publish(f"slmfleet/v1/dev-{i}/telemetry", b'{"n": %d}' % i, i + 1)
                      for i in range(500))
    reader = wire.FrameReader(64 * 1024)
    frames = parse_all(reader, [stream])
    assert len(frames) == 500
    parsed = [wire.parse_publish(first & 0x0F, body) for first, body in frames]  # type: ignore[misc]
    assert parsed[0] == ("slmfleet/v1/dev-0/telemetry", 1, b'{"n": 0}', False)
    assert parsed[499] == ("slmfleet/v1/dev-499/telemetry", 500, b'{"n": 499}', False)


def test_a_packet_cut_at_every_byte_comes_out_whole_once() -> None:
    first = publish("slmfleet/v1/a/telemetry", b"x" * 300, 7, retain=True,
                    properties=b"\x02\x00\x00\x00\x3c")  # message expiry interval
    second = publish("slmfleet/v1/b/hello", b"{}", None)
    stream = first + second
    for cut in range(1, len(stream)):
        reader = wire.FrameReader(1024, size=16)  # smaller than a packet: the buffer grows
        frames = parse_all(reader, [stream[:cut], stream[cut:]])
        assert [wire.parse_publish(f[0] & 0x0F, f[1]) for f in frames] == [  # type: ignore[index]
            ("slmfleet/v1/a/telemetry", 7, b"x" * 300, True),
            ("slmfleet/v1/b/hello", None, b"{}", False),
        ], cut


def test_an_oversized_packet_is_skipped_unheld_and_its_id_kept_for_the_ack() -> None:
    big = publish("slmfleet/v1/a/telemetry", b"y" * 100_000, 42)
    after = publish("slmfleet/v1/a/telemetry", b"ok", 43)
    reader = wire.FrameReader(max_packet=4096, size=1024)
    chunks = [big[i:i + 700] for i in range(0, len(big), 700)] + [after]
    frames = parse_all(reader, chunks)
    assert frames[0] == wire.Skipped(big[0], 42)
    assert wire.parse_publish(frames[1][0] & 0x0F, frames[1][1]) == (  # type: ignore[index]
        "slmfleet/v1/a/telemetry", 43, b"ok", False)
    assert len(frames) == 2
    assert len(reader.space()) <= 1024  # never grew to hold the skipped packet


def test_a_malformed_publish_is_refused_with_its_packet_id() -> None:
    good = publish("slmfleet/v1/a/telemetry", b"{}", 9)
    # the topic length says 60,000 bytes: past the packet's end
    bad_body = struct.pack("!H", 60_000) + b"abc"
    with pytest.raises(wire.MalformedPacket) as caught:
        wire.parse_publish(0x02, bad_body)
    assert getattr(caught.value, "packet_id", "absent") is None
    bad_utf8 = publish("x", b"{}", 11).replace(b"x", b"\xff", 1)
    frames = parse_all(wire.FrameReader(1024), [bad_utf8 + good])
    with pytest.raises(wire.MalformedPacket) as caught:
        wire.parse_publish(frames[0][0] & 0x0F, frames[0][1])  # type: ignore[index]
    assert caught.value.packet_id == 11  # type: ignore[attr-defined]
    assert wire.parse_publish(frames[1][0] & 0x0F, frames[1][1])[1] == 9  # type: ignore[index]


def test_a_remaining_length_over_four_bytes_cannot_be_split() -> None:
    reader = wire.FrameReader(1024)
    with pytest.raises(wire.MalformedStream):
        parse_all(reader, [b"\x30\xff\xff\xff\xff\x01"])


def test_connect_subscribe_and_acks_as_the_standard_writes_them() -> None:
    packet = wire.connect_packet("cp-1", "slmfleet-cp", "pw", keepalive_s=30,
                                 clean_start=False, session_expiry_s=3600)
    assert packet[0] == 0x10
    assert packet[2:10] == b"\x00\x04MQTT\x05" + bytes([0x80 | 0x40])  # user, password, resume
    assert b"\x11\x00\x00\x0e\x10" in packet  # session expiry 3600
    assert packet.endswith(b"\x00\x04cp-1\x00\x0bslmfleet-cp\x00\x02pw")
    clean = wire.connect_packet("cp-2", None, None, keepalive_s=30, clean_start=True)
    assert clean[9] == 0x02 and b"\x11" not in clean[10:14]
    sub = wire.subscribe_packet(1, ["a/+/b", "$share/g/a/+/c"], wire.SUBSCRIBE_QOS1_RETAIN_IF_NEW)
    assert sub == b"\x82" + wire.varint(len(sub) - 2) + b"\x00\x01\x00" \
        + b"\x00\x05a/+/b\x11" + b"\x00\x0e$share/g/a/+/c\x11"
    assert wire.pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"
    assert wire.parse_suback(b"\x00\x01\x00\x01\x87") == (1, [0x01, 0x87])
    refused = wire.parse_connack(b"\x00\x86\x00")
    assert refused.refused and "bad user name or password" in refused.describe()
