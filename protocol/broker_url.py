"""What an MQTT broker URL must look like, for the agent's and the control plane's settings."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_broker_url(value: str) -> str:
    """Return ``value`` unchanged if it is ``mqtt://host[:port]`` or ``mqtts://…``.

    Raises ``ValueError`` otherwise (a wrong scheme, no host, a port that
    is not a number), so a typo fails at startup rather than on first connect.
    """
    url = urlsplit(value)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883 (TLS)")
    try:
        url.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    return value
