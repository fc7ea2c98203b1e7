"""Turn one raw MQTT message from a device into a validated ingest item."""

from __future__ import annotations

import time

import protocol
from protocol import DEVICE_TO_CP, ProtocolError, TopicError

from ..db.writes import IngestItem


class DeviceIdMismatch(ProtocolError):
    """The payload names another device than the topic it was published on.

    The broker ACL already keeps a device under its own topic; this catches a
    payload that lies about its sender, or a misconfigured publisher.
    """

    reason = "id_mismatch"


class EmptyPayload(ProtocolError):
    """A zero-length payload: how a retained message is cleared, not a report."""

    reason = "empty"


class ClockSkew(ProtocolError):
    """A heartbeat stamped too far from when it arrived: the device's clock is off.

    Raw telemetry is kept, and on PostgreSQL partitioned, by its ``ts``; a
    clock years off would put it in no day partition and beyond retention.
    Its figures are refused, but the device was heard: ``heard`` is the
    liveness the heartbeat carried (an ``online`` state at its arrival),
    which the ingest still writes, so offline detection does not take a
    device with a wrong clock for a silent one.
    """

    reason = "clock_skew"

    def __init__(self, message: str, heard: IngestItem) -> None:
        super().__init__(message)
        self.heard = heard


def decode_device_message(
    topic: str, payload: bytes, retained: bool, received_at: float | None = None,
    max_skew_s: float | None = None,
) -> IngestItem:
    """Validate one MQTT message into an :class:`IngestItem`; raise ProtocolError.

    With ``max_skew_s``, a heartbeat whose ``ts`` is further than that from
    ``received_at`` is refused (:class:`ClockSkew`).
    """
    device_id, kind = protocol.parse_topic(topic)
    if kind not in DEVICE_TO_CP:
        raise TopicError(f"topic {topic!r} is not a device-to-control-plane topic")
    if not payload:
        raise EmptyPayload(f"empty payload on {topic!r}")
    message = protocol.decode(kind, payload)
    if message.device_id != device_id:
        raise DeviceIdMismatch(
            f"payload device_id {message.device_id!r} differs from topic device {device_id!r}"
        )
    at = time.time() if received_at is None else received_at
    if max_skew_s is not None and isinstance(message, protocol.Telemetry) \
            and abs(message.ts - at) > max_skew_s:
        heard = protocol.State(device_id=device_id, state=protocol.DeviceState.ONLINE, ts=at)
        raise ClockSkew(f"heartbeat ts {message.ts:.0f} is {message.ts - at:+.0f} s from its "
                        f"arrival (at most {max_skew_s:.0f} s accepted)",
                        IngestItem(protocol.TopicKind.STATE, heard, at, retained))
    return IngestItem(kind, message, at, retained)
