"""How a device's update ended, from the events it reported: pure functions.

Every :class:`protocol.EventCode` has one :class:`Treatment` in
:data:`TREATMENT`, read from the event's ``code`` (never from its free-text
``reason``; an event in the old form gets its code when it is decoded):

* **incompatible**: the device cannot run this variant (no variant for its
  tier, or the variant does not fit its RAM or disk). Not the release's
  fault; the device leaves the rollout and counts against no gate.
* **failed**: everything else. The update ended on the device and the gates
  count it.

Waiting is neither: a device whose latest event is ``waiting_window``,
``waiting_network``, ``deferred`` (or ``staged`` with a ``deferred`` reason)
is ``waiting``, with that event's reason, until a later event moves it on.

There is no "transient" treatment, on purpose: the engine sees only final
events (``activated``, ``failed``, ``rejected``, ``rolled_back``), and an
agent reports a transport error as final only after its own retries
(``download_attempts`` with back-off) gave up, so by then the failure is as
final for this assignment as any other. The transport codes are therefore
``failed``, as they always were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from controlplane.db.statuses import MemberState
from protocol import EventCode, EventType


class Treatment(StrEnum):
    """What a final, unsuccessful event's code makes of the device in the rollout."""

    INCOMPATIBLE = "incompatible"
    FAILED = "failed"


_I, _F = Treatment.INCOMPATIBLE, Treatment.FAILED

#: every code an agent can report, and how the engine treats it
TREATMENT: Mapping[EventCode, Treatment] = MappingProxyType({
    # the remote data is bad
    EventCode.PROTOCOL_ERROR: _F,
    EventCode.TOO_LARGE: _F,
    EventCode.MALFORMED: _F,
    EventCode.WRONG_SCHEMA: _F,
    EventCode.BAD_TOPIC: _F,
    EventCode.BAD_SIGNATURE: _F,
    EventCode.THRESHOLD_NOT_MET: _F,
    EventCode.EXPIRED: _F,
    EventCode.KEYS_EXPIRED: _F,
    EventCode.NOT_YET_VALID: _F,
    EventCode.REPLAYED_SEQUENCE: _F,
    EventCode.WRONG_DEVICE: _F,
    EventCode.WRONG_ROLE: _F,
    EventCode.BAD_VERSION: _F,
    # the device cannot run this variant
    EventCode.NO_VARIANT: _I,
    EventCode.DOES_NOT_FIT: _I,
    EventCode.BASE_MISMATCH: _I,
    EventCode.INSUFFICIENT_RAM: _I,
    EventCode.INSUFFICIENT_DISK: _I,
    # the transport failed, and the agent's retries with it (see above)
    EventCode.TRANSPORT: _F,
    EventCode.HTTP_STATUS: _F,
    EventCode.RANGE_NOT_SATISFIABLE: _F,
    EventCode.BAD_RESPONSE: _F,
    EventCode.INTERRUPTED: _F,
    EventCode.TOO_SLOW: _F,
    EventCode.CANCELLED: _F,
    # the artifact is bad
    EventCode.BAD_ARTIFACT: _F,
    EventCode.TOO_LONG: _F,
    EventCode.SIZE_MISMATCH: _F,
    EventCode.HASH_MISMATCH: _F,
    EventCode.TOKENIZER_MISMATCH: _F,
    EventCode.NO_ARTIFACT_URL: _F,
    # the device's own state
    EventCode.STORE_CORRUPT: _F,
    EventCode.STORE_CONFLICT: _F,
    EventCode.DISK_ERROR: _F,
    EventCode.INTERNAL_ERROR: _F,
    EventCode.STATE_CORRUPT: _F,
    EventCode.KEYS_UNAVAILABLE: _F,
    EventCode.CRASH_LOOP: _F,
    # the model itself
    EventCode.HEALTH_FAILED: _F,
    EventCode.ACTIVE_BROKEN: _F,
    # replaced before it finished
    EventCode.SUPERSEDED: _F,
    # waiting, not failing: these never end an update (they ride on waiting,
    # deferred and activated events, which are not outcomes); a final event
    # carrying one would be an agent bug, counted as a failure
    EventCode.DOWNLOAD_WINDOW: _F,
    EventCode.ACTIVATION_WINDOW: _F,
    EventCode.METERED: _F,
    EventCode.LOCKED: _F,
    EventCode.LOCK_OVERRIDDEN: _F,
})

_FINAL_EVENTS = frozenset({EventType.ACTIVATED, EventType.FAILED, EventType.REJECTED,
                           EventType.ROLLED_BACK})
#: events that say the update waits on the device, neither failed nor stuck
WAITING_EVENTS = frozenset({EventType.WAITING_WINDOW, EventType.WAITING_NETWORK,
                            EventType.DEFERRED})


def treatment(code: EventCode | None) -> Treatment:
    """How the engine treats an unsuccessful final event with ``code``; no code: failed."""
    return _F if code is None else TREATMENT[code]


@dataclass(frozen=True)
class ReportedEvent:
    """One event a device reported for its assignment, as the engine reads it."""

    assignment_id: str
    type: str
    code: EventCode | None
    reason: str | None


def outcome(events: Iterable[ReportedEvent]) -> dict[str, str | None]:
    """A member's ``state``, ``health`` and ``reason`` from its assignment's events, in order.

    Only the keys the events say something about are present; the last
    final event decides the state. Before one, a waiting event makes the
    member ``waiting`` (its reason the event's) and any later step puts it
    back to ``assigned``.
    """
    values: dict[str, str | None] = {}
    for ev in events:
        if ev.type == EventType.HEALTH_PASSED:
            values["health"] = "passed"
        elif ev.type == EventType.HEALTH_FAILED:
            values["health"] = "failed"
        if ev.type not in _FINAL_EVENTS:
            if is_waiting(ev):
                values["state"], values["reason"] = MemberState.WAITING, \
                    f"{ev.type}: {ev.reason or ''}"
            elif values.get("state") == MemberState.WAITING:
                values["state"], values["reason"] = MemberState.ASSIGNED, None
            continue
        if ev.type == EventType.ACTIVATED:
            values["state"], values["reason"] = MemberState.SUCCEEDED, None
        elif treatment(ev.code) is Treatment.INCOMPATIBLE:
            values["state"], values["reason"] = MemberState.INCOMPATIBLE, ev.reason
        else:
            values["state"], values["reason"] = MemberState.FAILED, f"{ev.type}: {ev.reason or ''}"
    return values


def is_waiting(ev: ReportedEvent) -> bool:
    """Whether ``ev`` says the update waits on the device (a window, a lock, the network)."""
    if ev.type in WAITING_EVENTS:
        return True
    return ev.type == EventType.STAGED and (ev.reason or "").startswith(EventType.DEFERRED.value)


def changed_outcomes(
    members: Mapping[str, Any], events: Mapping[str, Iterable[ReportedEvent]]
) -> list[tuple[Any, dict[str, str | None]]]:
    """``(member, values)`` for each member (a :class:`controlplane.rollouts.queries.Member`,
    by assignment id) whose events say something its row does not say yet."""
    changed = []
    for assignment_id, reported in events.items():
        member = members[assignment_id]
        values = outcome(reported)
        if values and any(getattr(member, k) != v for k, v in values.items()):
            changed.append((member, values))
    return changed
