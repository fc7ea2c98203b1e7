"""MQTT topic names: ``slmfleet/v1/dev/{device_id}/{kind}``.

Device ids are restricted so they can never contain MQTT wildcards or level
separators, which keeps broker ACL patterns like ``slmfleet/v1/dev/%u/#``
sound.
"""

from __future__ import annotations

import re
from enum import StrEnum

from .errors import TopicError

TOPIC_ROOT = "slmfleet/v1/dev"

#: lowercase letters, digits, '.', '_' and '-'; starts with a letter or digit;
#: 1..64 characters. No '/', '+', '#' or '$' can appear.
DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


class TopicKind(StrEnum):
    """The last level of a device topic."""

    HELLO = "hello"
    STATE = "state"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    DESIRED = "desired"


#: topics a device publishes (the control plane ingests these)
DEVICE_TO_CP: tuple[TopicKind, ...] = (
    TopicKind.HELLO,
    TopicKind.STATE,
    TopicKind.TELEMETRY,
    TopicKind.EVENTS,
)


def is_valid_device_id(device_id: str) -> bool:
    """Return True if ``device_id`` is a well-formed device id."""
    return bool(_DEVICE_ID_RE.match(device_id))


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged, or raise ``ValueError`` if malformed."""
    if not is_valid_device_id(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-64 of a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return device_id


def device_topic(device_id: str, kind: TopicKind | str) -> str:
    """Build the topic for ``kind`` under ``device_id``."""
    return f"{TOPIC_ROOT}/{check_device_id(device_id)}/{TopicKind(kind).value}"


def subscription(kind: TopicKind | str, shared_group: str | None = None) -> str:
    """Wildcard subscription for ``kind`` across all devices.

    With ``shared_group`` it becomes an MQTT v5 shared subscription so several
    control-plane replicas split the stream.
    """
    topic = f"{TOPIC_ROOT}/+/{TopicKind(kind).value}"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


def parse_topic(topic: str) -> tuple[str, TopicKind]:
    """Split a device topic into ``(device_id, kind)``; raise :class:`TopicError`."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is outside {TOPIC_ROOT}/")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2:
        raise TopicError(f"topic {topic!r} must be {TOPIC_ROOT}/<device_id>/<kind>")
    device_id, kind = parts
    if not is_valid_device_id(device_id):
        raise TopicError(f"topic {topic!r} has an invalid device id")
    try:
        return device_id, TopicKind(kind)
    except ValueError:
        raise TopicError(f"topic {topic!r} has unknown kind {kind!r}") from None
