"""When and how fast a device may update one model: windows, caps, metered links, lock override.

An :class:`UpdatePolicy` rides in each entry of the director-signed
assignment set (the ``desired`` topic is the only channel from the control
plane to an agent, so none of this is ever an unsigned side message):

* ``download_window``: outside it the agent holds the download
  (``waiting_window``);
* ``activation_window``: the candidate downloads and passes its health
  check, then stays ``staged`` until the window opens;
* ``max_bytes_per_s``: a download rate cap (overrides the agent's setting
  when lower);
* ``allow_metered``: without it a device on a metered link holds the
  download (``waiting_network``);
* ``lock_override``: update locks taken by apps on the device before
  ``issued_at`` no longer defer this activation (an operator's override).

A :class:`Window` opens at each time its 5-field cron expression fires (in
its time zone: an IANA name, or ``local`` for the device's own zone) and
stays open ``duration_s``. Pure: every function takes the time it is given.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, StringConstraints, field_validator

from .messages import Wire

#: a window's time zone that means "the device's own zone"
LOCAL_ZONE = "local"
#: a window stays open at least a minute and at most a week
MIN_WINDOW_S = 60
MAX_WINDOW_S = 7 * 24 * 3600
#: how far ahead :meth:`Window.next_open` looks before it gives up
HORIZON = timedelta(days=400)

_Reason = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _cron(expr: str, start: datetime, *, reverse: bool = False):
    from cronsim import CronSim

    return CronSim(expr, start, reverse=reverse)


def zone(name: str, local: tzinfo | None = None) -> tzinfo:
    """The ``tzinfo`` a window's ``tz`` names; ``local`` is ``local`` (UTC when not given)."""
    if name == LOCAL_ZONE:
        return local or UTC
    return ZoneInfo(name)


class Window(Wire):
    """A recurring window: opens when ``cron`` fires, stays open ``duration_s``."""

    #: five fields: minute hour day-of-month month day-of-week (e.g. ``0 2 * * *``)
    cron: Annotated[str, StringConstraints(min_length=9, max_length=128)]
    duration_s: Annotated[int, Field(strict=True, ge=MIN_WINDOW_S, le=MAX_WINDOW_S)]
    #: IANA zone (``Europe/Berlin``) or ``local``
    tz: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "UTC"

    @field_validator("cron")
    @classmethod
    def _parses(cls, value: str) -> str:
        from cronsim import CronSimError

        if len(value.split()) != 5:
            raise ValueError("cron must have five fields: minute hour day month weekday")
        try:
            _cron(value, datetime(2026, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            raise ValueError(f"cron does not parse: {exc}") from None
        return value

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value != LOCAL_ZONE:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def _now(self, now: float, local: tzinfo | None) -> datetime:
        return datetime.fromtimestamp(now, zone(self.tz, local))

    def last_opened(self, now: float, local: tzinfo | None = None) -> float | None:
        """When the window last opened at or before ``now`` (epoch seconds), None if never."""
        moment = self._now(now, local)
        opened = next(_cron(self.cron, moment, reverse=True), None)
        # cronsim iterates strictly before (and after) its start: a window
        # that fires exactly now is open now.
        if moment.second == 0 and moment.microsecond == 0:
            fired = next(_cron(self.cron, moment - timedelta(minutes=1)), None)
            if fired is not None and fired.timestamp() == moment.timestamp():
                opened = fired
        if opened is None:
            return None
        return opened.timestamp()

    def is_open(self, now: float, local: tzinfo | None = None) -> bool:
        """True while a window that opened at or before ``now`` has not yet closed."""
        opened = self.last_opened(now, local)
        return opened is not None and now < opened + self.duration_s

    def closes_at(self, now: float, local: tzinfo | None = None) -> float | None:
        """When the window open at ``now`` closes; None when it is closed."""
        opened = self.last_opened(now, local)
        if opened is None or now >= opened + self.duration_s:
            return None
        return opened + self.duration_s

    def next_open(self, now: float, local: tzinfo | None = None) -> float | None:
        """``now`` when open, else when it next opens (epoch seconds); None past the horizon."""
        if self.is_open(now, local):
            return now
        moment = self._now(now, local)
        for fired in _cron(self.cron, moment):
            if fired - moment > HORIZON:
                return None
            if fired.timestamp() > now:
                return fired.timestamp()
        return None


class LockOverride(Wire):
    """An operator's override of the device's update locks, for this entry."""

    #: names the override in events and the audit log
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    #: locks taken before this instant (epoch seconds) no longer defer activation
    issued_at: Annotated[float, Field(ge=0)]
    reason: _Reason


class UpdatePolicy(Wire):
    """How one model's update may proceed on the device (signed, per assignment entry)."""

    download_window: Window | None = None
    activation_window: Window | None = None
    #: the download's rate cap; the lower of this and the agent's own setting applies
    max_bytes_per_s: Annotated[int, Field(strict=True, ge=1024)] | None = None
    #: may the download proceed on a link the system reports as metered
    allow_metered: Annotated[bool, Field(strict=True)] = False
    lock_override: LockOverride | None = None
