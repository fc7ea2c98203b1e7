"""The closed sets of states the control plane stores: one StrEnum each.

The tables store each member's *value* (``"active"``, ``"rolling_back"``),
exactly the strings earlier releases wrote, in a plain ``VARCHAR`` column:
:func:`status_type` tells SQLAlchemy so, instead of its default of storing
member names in a native PostgreSQL enum type. No data migration, and an
older control plane reading the same database sees what it always saw.

The API schemas, the director, the publisher and the rollout engine all
import these, so a state is spelled in one place.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Enum


class AssignmentStatus(StrEnum):
    """Where one signed assignment row stands (``assignments.status``)."""

    #: the device's live assignment; at most one row per device
    ACTIVE = "active"
    #: a newer row (a new assignment or a re-sign) replaced it
    SUPERSEDED = "superseded"
    #: unassigned: the device was told to keep what it runs
    REVOKED = "revoked"


class RolloutState(StrEnum):
    """Where a rollout stands (``rollouts.state``)."""

    ACTIVE = "active"
    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting_approval"
    ROLLING_BACK = "rolling_back"
    #: every stage passed; devices that join or return later still get the release
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    #: a newer rollout of the same model and target replaced it
    SUPERSEDED = "superseded"


#: rollouts the engine still ticks: a completed one keeps assigning devices
#: that join or come back later, and a newer rollout takes devices over from it
LIVE_ROLLOUT_STATES: tuple[RolloutState, ...] = (
    RolloutState.ACTIVE, RolloutState.PAUSED, RolloutState.AWAITING_APPROVAL,
    RolloutState.ROLLING_BACK, RolloutState.COMPLETED,
)
#: live rollouts still on their way somewhere (what metrics export); a
#: completed one has arrived, it only tops up newcomers
MOVING_ROLLOUT_STATES: tuple[RolloutState, ...] = tuple(
    s for s in LIVE_ROLLOUT_STATES if s is not RolloutState.COMPLETED
)
#: rollouts whose state never changes again (the API reports them by value)
FINISHED_ROLLOUT_STATES: frozenset[str] = frozenset(
    s.value for s in RolloutState if s not in MOVING_ROLLOUT_STATES
)


class MemberState(StrEnum):
    """Where one device stands in a rollout (``rollout_devices.state``)."""

    #: matched, not assigned yet (its stage has not come, or it is offline)
    PENDING = "pending"
    #: assigned; its update is in progress
    ASSIGNED = "assigned"
    #: assigned; its update waits on the device for a window, a lock or an
    #: unmetered link (neither failed nor stuck; its reason says why)
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: cannot run this release (no variant fits it); takes no part in stages
    INCOMPATIBLE = "incompatible"
    #: sent back to what it ran before by a rollback
    ROLLED_BACK = "rolled_back"
    #: taken over by a newer rollout of the same model
    SUPERSEDED = "superseded"


#: member states that take no part in stages and gates
OUT_OF_ROLLOUT: tuple[MemberState, ...] = (MemberState.INCOMPATIBLE, MemberState.SUPERSEDED)
#: member states whose update has ended one way or the other (gates count them)
REPORTED: frozenset[MemberState] = frozenset({MemberState.SUCCEEDED, MemberState.FAILED})


def status_type(enum: type[StrEnum], length: int) -> Enum:
    """A column type storing ``enum``'s values as ``VARCHAR(length)`` on every database.

    ``values_callable`` stores values, not member names; ``native_enum=False``
    keeps PostgreSQL from creating an enum type; ``validate_strings`` refuses
    a string that is no member's value before it reaches the database.
    """
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        values_callable=lambda members: [m.value for m in members],
        length=length,
        validate_strings=True,
    )
