"""The rollout engine's reads and writes, returning frozen values.

Everything a tick asks the database or tells it goes through here, so the
engine (:mod:`.engine`) is decisions over plain values. Statements over many
devices run in chunks of :data:`CHUNK` (SQLite caps the parameters of one
statement) or as one executemany: never one statement per device on the
paths a stage of thousands of devices takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, insert, select, update

from controlplane.db.models import AssignmentRecord, Device, DeviceEvent, DeviceLabel
from controlplane.db.statuses import (
    LIVE_ROLLOUT_STATES,
    AssignmentStatus,
    MemberState,
)
from controlplane.tier_policy import RAM_BYTES

from .gates import MemberView
from .outcome import ReportedEvent
from .spec import Target
from .store import RolloutRow, members, rollouts

#: ids per statement where a list of ids is bound
CHUNK = 500

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True)
class Member:
    """One device of a rollout and where it stands."""

    device_id: str
    device_tier: str | None
    state: MemberState
    stage_index: int | None
    assignment_id: str | None
    previous_ref: str | None
    health: str | None
    reason: str | None

    def view(self) -> MemberView:
        """What the gates need of it."""
        return MemberView(self.device_id, self.device_tier, self.state, self.health)


@dataclass(frozen=True)
class Candidate:
    """A device about to join a rollout: what its variant and previous version depend on."""

    id: str
    tier: str
    ram_bytes: int | None
    #: every active model by name, as the device's latest hello reported it
    models: dict[str, Any] | None

    def running(self, name: str) -> str | None:
        """``name@version`` of the model ``name`` the device runs, or None."""
        active = (self.models or {}).get(name) or {}
        return f"{name}@{active['version']}" if active.get("version") else None


@dataclass(frozen=True)
class Issued:
    """An assignment the director issued for the rollout."""

    device_id: str
    assignment_id: str
    issued_at: float


# -- rollouts ---------------------------------------------------------------------


def live_rollout_ids(conn: Connection) -> list[str]:
    """Ids of the rollouts the engine still ticks, oldest first."""
    return list(conn.execute(
        select(rollouts.c.id).where(rollouts.c.state.in_(LIVE_ROLLOUT_STATES))
        .order_by(rollouts.c.created_at)
    ).scalars())


def save_gates(conn: Connection, rollout_id: str, gates: list[dict[str, object]]) -> None:
    """Store the latest gate evaluation of the rollout's current stage."""
    conn.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(last_gates=gates))


# -- joining ----------------------------------------------------------------------


def matching_device_ids(conn: Connection, target: Target) -> list[str]:
    """Ids of the devices ``target`` selects (those that reported a tier), in id order."""
    query = select(Device.id).where(Device.tier.is_not(None))
    if target.tiers:
        query = query.where(Device.tier.in_([t.value for t in target.tiers]))
    if target.profiles:
        query = query.where(Device.profile.in_(target.profiles))
    if target.device_ids:
        query = query.where(Device.id.in_(target.device_ids))
    for key, value in target.labels.items():
        query = query.where(
            select(DeviceLabel.device_id).where(
                DeviceLabel.device_id == Device.id, DeviceLabel.key == key,
                DeviceLabel.value == value,
            ).exists()
        )
    return list(conn.execute(query.order_by(Device.id)).scalars())


def member_ids(conn: Connection, rollout_id: str) -> set[str]:
    """Ids of the devices the rollout already knows, whatever their state."""
    return set(conn.execute(
        select(members.c.device_id).where(members.c.rollout_id == rollout_id)
    ).scalars())


def candidates(conn: Connection, device_ids: Sequence[str]) -> list[Candidate]:
    """What joining needs of each device, in id order."""
    found: list[Candidate] = []
    for chunk in chunks(device_ids):
        found.extend(Candidate(d.id, d.tier, d.ram_bytes, d.models) for d in conn.execute(
            select(Device.id, Device.tier, RAM_BYTES.label("ram_bytes"), Device.models)
            .where(Device.id.in_(chunk))
        ).all())
    return sorted(found, key=lambda d: d.id)


def add_members(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert new members (one executemany)."""
    conn.execute(insert(members), rows)


def take_over(conn: Connection, rollout: RolloutRow, device_ids: Sequence[str],
              now: float) -> None:
    """Mark ``device_ids`` superseded in older live rollouts of the same model that
    still drive them (pending or assigned): ``rollout`` drives them now."""
    older = select(rollouts.c.id).where(
        rollouts.c.model_name == rollout.model_name, rollouts.c.id != rollout.id,
        rollouts.c.state.in_(LIVE_ROLLOUT_STATES),
        rollouts.c.created_at <= rollout.created_at,
    )
    for chunk in chunks(device_ids):
        conn.execute(
            update(members)
            .where(members.c.rollout_id.in_(older), members.c.device_id.in_(chunk),
                   members.c.state.in_((MemberState.PENDING, MemberState.ASSIGNED,
                                        MemberState.WAITING)))
            .values(state=MemberState.SUPERSEDED, reason=f"taken over by rollout {rollout.id}",
                    updated_at=now)
        )


# -- observing --------------------------------------------------------------------


def members_of(conn: Connection, rollout_id: str) -> list[Member]:
    """Every member of the rollout, in cohort order."""
    m = members.c
    return [Member(*row) for row in conn.execute(
        select(m.device_id, m.device_tier, m.state, m.stage_index, m.assignment_id,
               m.previous_ref, m.health, m.reason)
        .where(m.rollout_id == rollout_id).order_by(m.cohort_key)
    ).all()]


def issued_any(conn: Connection, rollout_id: str) -> bool:
    """Whether the director ever issued an assignment for the rollout."""
    return conn.execute(
        select(AssignmentRecord.id).where(AssignmentRecord.rollout_id == rollout_id).limit(1)
    ).first() is not None


def issued_to(conn: Connection, rollout_id: str, device_ids: Sequence[str]) -> list[Issued]:
    """The rollout's live assignments among ``device_ids``."""
    found: list[Issued] = []
    for chunk in chunks(device_ids):
        found.extend(Issued(*row) for row in conn.execute(
            select(AssignmentRecord.device_id, AssignmentRecord.assignment_id,
                   AssignmentRecord.issued_at)
            .where(AssignmentRecord.rollout_id == rollout_id,
                   AssignmentRecord.status == AssignmentStatus.ACTIVE,
                   AssignmentRecord.device_id.in_(chunk))
        ).all())
    return found


def events_for(conn: Connection, assignment_ids: Sequence[str]) -> dict[str, list[ReportedEvent]]:
    """The events reported for each of ``assignment_ids``, in the order they happened."""
    events: dict[str, list[ReportedEvent]] = {}
    for chunk in chunks(assignment_ids):
        for row in conn.execute(
            select(DeviceEvent.assignment_id, DeviceEvent.type, DeviceEvent.code,
                   DeviceEvent.reason)
            .where(DeviceEvent.assignment_id.in_(chunk))
            .order_by(DeviceEvent.ts, DeviceEvent.id)
        ).all():
            events.setdefault(row.assignment_id, []).append(
                ReportedEvent(row.assignment_id, row.type, row.code, row.reason))
    return events


def set_outcomes(conn: Connection, rollout_id: str,
                 changes: Sequence[tuple[Member, dict[str, Any]]], now: float) -> None:
    """Record what each member's assignment came to (``values``: state, health, reason;
    those left out keep the member's), in one executemany: a stage of thousands of
    devices going from waiting to activated is one round trip, not one per device."""
    if not changes:
        return
    m = members.c
    conn.execute(
        update(members)
        .where(m.rollout_id == rollout_id, m.device_id == bindparam("b_d"),
               m.assignment_id == bindparam("b_a"))
        .values(state=bindparam("b_s"), health=bindparam("b_h"), reason=bindparam("b_r"),
                updated_at=now),
        [{"b_d": member.device_id, "b_a": member.assignment_id,
          "b_s": values.get("state", member.state), "b_h": values.get("health", member.health),
          "b_r": values.get("reason", member.reason)} for member, values in changes],
    )


# -- assigning --------------------------------------------------------------------


def online_ids(conn: Connection, device_ids: Sequence[str]) -> set[str]:
    """Which of ``device_ids`` are online now.

    By primary key, the flag read and tested here: with ``online`` in the
    WHERE clause SQLite walks the liveness index's every online device for
    each chunk (the fleet times the chunks, 200,000 index rows to check
    10,000 devices), not the chunk's rows.
    """
    online: set[str] = set()
    for chunk in chunks(device_ids):
        online.update(device_id for device_id, is_online in conn.execute(
            select(Device.id, Device.online).where(Device.id.in_(chunk))) if is_online)
    return online


def _update_pending(conn: Connection, rollout_id: str, params: list[dict[str, Any]],
                    **values: Any) -> None:
    """Apply ``values`` to each still-pending member ``params`` names (bind ``d``),
    in one executemany: a stage of thousands is one round trip, not one per device."""
    if not params:
        return
    m = members.c
    conn.execute(
        update(members)
        .where(m.rollout_id == rollout_id, m.device_id == bindparam("d"),
               m.state == MemberState.PENDING)
        .values(**values),
        params,
    )


def mark_assigned(conn: Connection, rollout_id: str, issued: Iterable[Issued],
                  stage_index: int, now: float) -> None:
    """Pending members that got an assignment become ``assigned``."""
    _update_pending(
        conn, rollout_id,
        [{"d": i.device_id, "a": i.assignment_id, "at": i.issued_at} for i in issued],
        state=MemberState.ASSIGNED, assignment_id=bindparam("a"), assigned_at=bindparam("at"),
        stage_index=stage_index, updated_at=now,
    )


def mark_incompatible(conn: Connection, rollout_id: str, refused: dict[str, str | None],
                      now: float) -> None:
    """Pending members the director refused become ``incompatible`` with its reason."""
    _update_pending(
        conn, rollout_id, [{"d": d, "r": r} for d, r in refused.items()],
        state=MemberState.INCOMPATIBLE, reason=bindparam("r"), updated_at=now,
    )


def mark_rolled_back(conn: Connection, rollout_id: str, device_ids: Sequence[str],
                     reason: str, now: float) -> None:
    """Members sent back by a rollback, with what was done for them."""
    for chunk in chunks(device_ids):
        conn.execute(
            update(members)
            .where(members.c.rollout_id == rollout_id, members.c.device_id.in_(chunk))
            .values(state=MemberState.ROLLED_BACK, reason=reason, updated_at=now)
        )

