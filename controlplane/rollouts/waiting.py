"""Devices that wait on a window, a lock or the network, and when a stage's bake starts.

A device waiting for its download window or an unmetered link has not
downloaded yet: it still holds one of the rollout's download slots
(``max_concurrent_downloads``), so the cap holds when the window opens. One
deferred for activation (its activation window is closed, or an app on it
holds an update lock) has downloaded and been health-checked: it holds
none. Neither is failed, and neither keeps a stage from advancing: a stage
waits for enough **activated** devices instead, and its bake time counts
from the moment it had them, not from its assignment (an activation window
may open hours after the assignment went out). Pure functions over the
members' states.

A waiting member's reason is its latest waiting event's ``"<type>: <reason>"``;
:func:`waiting_until` reads the instant the device said it waits for (the
first ISO 8601 time in the reason, as agents write the next opening).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from controlplane.db.statuses import MemberState
from protocol import EventType

from .queries import Member
from .spec import Gates

#: waits before the download: the device still needs its download slot
_BEFORE_DOWNLOAD = (EventType.WAITING_WINDOW.value, EventType.WAITING_NETWORK.value)
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")


def holds_download_slot(member: Member) -> bool:
    """Whether ``member`` counts against ``max_concurrent_downloads``."""
    if member.state == MemberState.ASSIGNED:
        return True
    return member.state == MemberState.WAITING and (member.reason or "").startswith(
        _BEFORE_DOWNLOAD)


def activations_needed(cohort: Sequence[Member], gates: Gates) -> int:
    """Activated devices the stage needs before its bake starts: the gates'
    ``min_devices_reporting`` (at least one), never more than the devices
    of the stage that have not failed."""
    alive = sum(m.state != MemberState.FAILED for m in cohort)
    return min(max(1, gates.min_devices_reporting or 0), alive)


def bake_may_start(cohort: Sequence[Member], gates: Gates) -> bool:
    """Whether the stage's bake may start: nothing still downloading or checking,
    and enough activated devices (waiting ones hold nothing up)."""
    if any(m.state == MemberState.ASSIGNED for m in cohort):
        return False
    activated = sum(m.state == MemberState.SUCCEEDED for m in cohort)
    return activated >= activations_needed(cohort, gates)


def waiting_until(reason: str | None) -> float | None:
    """The epoch time a waiting reason names (the first ISO 8601 time in it), or None."""
    match = _ISO.search(reason or "")
    if match is None:
        return None
    try:
        moment = datetime.fromisoformat(match.group(0).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # a local time of unknown zone: better unsaid than wrong
    return moment.timestamp()

