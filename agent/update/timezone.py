"""The device's own time zone, for update windows whose ``tz`` is ``local``."""

from __future__ import annotations

import logging
from datetime import UTC, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger(__name__)

#: the system's zone, as systemd and glibc read it
LOCALTIME = Path("/etc/localtime")


def check_zone(name: str) -> str:
    """``name`` if it is a known IANA zone (``Europe/Berlin``), else ValueError."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as "
                         "Europe/Berlin)") from None
    return name


def device_zone(name: str | None, localtime: Path = LOCALTIME) -> tzinfo:
    """The zone ``name`` names, or (None) the system's, read from ``localtime``.

    A zone file rather than Python's local offset: the offset of today would
    be wrong after the next daylight-saving change. No zone file: UTC.
    """
    if name is not None:
        return ZoneInfo(name)
    try:
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError) as exc:
        log.warning("no system time zone (%s): local update windows are in UTC", exc)
        return UTC
