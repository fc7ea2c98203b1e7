"""Read queries over assignments: a device's live entries and its merged timeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ScalarResult, and_, or_, select, true
from sqlalchemy.orm import Session

from controlplane.attributes import same_named

from .models import AssignmentRecord, DeviceEvent, DeviceSequence
from .statuses import AssignmentStatus

#: tie-break between timeline sources at the same timestamp: an assignment is
#: issued before the device can react to it
ISSUED, ENDED, EVENT = 0, 1, 2


@dataclass(frozen=True)
class TimelineKey:
    """Position in a timeline: ``(ts, source, id)``, strictly increasing."""

    ts: float
    source: int
    id: int

    def encode(self) -> str:
        """Text form for a cursor (``repr`` round-trips floats exactly)."""
        return f"{self.ts!r} {self.source} {self.id}"

    @classmethod
    def decode(cls, text: str) -> TimelineKey:
        """Parse :meth:`encode`'s output; ``ValueError`` for anything else."""
        ts, source, id_ = text.split(" ")
        return cls(float(ts), int(source), int(id_))


@dataclass(frozen=True)
class TimelineEntry:
    """One timeline row and its position."""

    key: TimelineKey
    kind: Literal["assignment", "event"]
    type: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class LiveAssignment:
    """A device's active assignment of one model and whether the broker acknowledged it."""

    model_name: str
    assignment_id: str
    ref: str
    tier: str
    sequence: int
    issued_at: float
    expires_at: float
    rollout_id: str | None
    published: bool


def current_assignments(session: Session, device_id: str) -> dict[str, LiveAssignment]:
    """The device's active assignments by model name, the most recently assigned first."""
    rows = session.scalars(
        select(AssignmentRecord).where(
            AssignmentRecord.device_id == device_id,
            AssignmentRecord.status == AssignmentStatus.ACTIVE,
        ).order_by(AssignmentRecord.kind, AssignmentRecord.id.desc())
    ).all()
    counter = session.get(DeviceSequence, device_id)
    published = counter.published_sequence if counter is not None else 0
    return {
        row.model_name: LiveAssignment(
            **same_named(row, "model_name", "assignment_id", "ref", "tier", "sequence",
                         "issued_at", "expires_at", "rollout_id"),
            published=published >= row.sequence,
        )
        for row in rows
    }


def current_assignment(session: Session, device_id: str) -> LiveAssignment | None:
    """The device's most recently assigned active entry, or None (its only one in the old form)."""
    return next(iter(current_assignments(session, device_id).values()), None)


@dataclass(frozen=True)
class _Page:
    """One timeline request: whose entries, past which key, and how many."""

    session: Session
    device_id: str
    after: TimelineKey | None
    limit: int

    def read(self, table: Any, ts_col: Any, source: int, *where: Any) -> ScalarResult[Any]:
        """Up to ``limit`` rows of ``table`` for the device past ``after``, in (ts, id) order.

        Each source is read in its own key order, so its first ``limit`` rows
        past the cursor are all the merge can need from it.
        """
        return self.session.scalars(
            select(table)
            .where(
                table.device_id == self.device_id,
                *where,
                _after(ts_col, table.id, source, self.after),
            )
            .order_by(ts_col, table.id)
            .limit(self.limit)
        )


def _after(ts_col: Any, id_col: Any, source: int, after: TimelineKey | None) -> Any:
    if after is None:
        return true()
    if source > after.source:
        return ts_col >= after.ts
    if source < after.source:
        return ts_col > after.ts
    return or_(ts_col > after.ts, and_(ts_col == after.ts, id_col > after.id))


def _assignment_fields(row: AssignmentRecord) -> dict[str, Any]:
    return {
        "model": row.model_name,
        "assignment_id": row.assignment_id,
        "ref": row.ref,
        "tier": row.tier,
        "sequence": row.sequence,
        "rollout_id": row.rollout_id,
        "expires_at": row.expires_at,
    }


def device_timeline(
    session: Session, device_id: str, *, after: TimelineKey | None, limit: int,
    model: str | None = None,
) -> list[TimelineEntry]:
    """Up to ``limit`` timeline entries of ``device_id`` after ``after``, oldest first.

    Merges three sources, each read in key order: assignments issued (by
    ``issued_at``), assignments revoked (by ``ended_at``) and device events
    (by the device's own ``ts``). With ``model``, only that model name's
    assignments and the events about them (by their assignment id).
    """
    A, E = AssignmentRecord, DeviceEvent
    entries: list[TimelineEntry] = []
    page = _Page(session, device_id, after, limit)
    of_model: tuple[Any, ...] = () if model is None else (A.model_name == model,)
    events_of_model: tuple[Any, ...] = () if model is None else (E.assignment_id.in_(
        select(A.assignment_id).where(A.device_id == device_id, A.model_name == model)
    ),)
    for row in page.read(A, A.issued_at, ISSUED, *of_model):
        entries.append(
            TimelineEntry(
                TimelineKey(row.issued_at, ISSUED, row.id),
                "assignment",
                "refreshed" if row.kind == "refresh" else "assigned",
                _assignment_fields(row),
            )
        )
    revoked = (A.status == AssignmentStatus.REVOKED, A.ended_at.is_not(None))
    for row in page.read(A, A.ended_at, ENDED, *revoked, *of_model):
        assert row.ended_at is not None
        entries.append(
            TimelineEntry(
                TimelineKey(row.ended_at, ENDED, row.id),
                "assignment",
                "unassigned",
                _assignment_fields(row),
            )
        )
    for ev in page.read(E, E.ts, EVENT, *events_of_model):
        entries.append(
            TimelineEntry(
                TimelineKey(ev.ts, EVENT, ev.id),
                "event",
                ev.type,
                {
                    "assignment_id": ev.assignment_id,
                    "seq": ev.seq,
                    "code": ev.code,
                    "reason": ev.reason,
                    "progress_pct": ev.progress_pct,
                    "downloaded_bytes": ev.downloaded_bytes,
                    "received_at": ev.received_at,
                },
            )
        )
    entries.sort(key=lambda e: (e.key.ts, e.key.source, e.key.id))
    return entries[:limit]
