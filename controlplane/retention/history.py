"""History retention: assignment entries no longer active, superseded capability reports.

A device's timeline (``GET /v1/devices/{id}/history``) merges the entries
the director issued it with its events; an entry stops being ``active``
when a newer document supersedes or revokes it, and from then on it is
history. Such entries, and capability reports a newer one from the same
device has replaced, go after ``history_days``. What stays:

- every ``active`` entry, and each device's newest capability report,
  whatever their age;
- entries that ended after the oldest rollout still in progress began (its
  gates and rollback read its members' entries);
- anything inside ``audit_window_days`` (the settings refuse a
  ``history_days`` shorter than it).
"""

from __future__ import annotations

from sqlalchemy import Engine, Table, exists, select
from sqlalchemy.orm import aliased

from ..db.models import AssignmentRecord, CapabilitySnapshot
from ..db.statuses import AssignmentStatus
from .prune import delete_matching, last_id_before

assignments: Table = AssignmentRecord.__table__  # type: ignore[assignment]
snapshots: Table = CapabilitySnapshot.__table__  # type: ignore[assignment]


def prune_history(engine: Engine, cutoff: float, *, batch: int, deadline: float
                  ) -> tuple[int, int]:
    """Delete history that ended (or was replaced) before ``cutoff``, in batches;
    return how many assignment entries and capability reports went."""
    # ended_at is indexed (ix_assignments_ended_at): each batch reads a range of it
    entries = delete_matching(
        engine, assignments,
        (assignments.c.ended_at < cutoff)
        & (assignments.c.status != AssignmentStatus.ACTIVE),
        batch=batch, deadline=deadline)
    # Reports are stored in arrival order, so ids follow received_at.
    last = last_id_before(engine, snapshots, "received_at", cutoff)
    reports = 0
    if last is not None:
        newer = aliased(snapshots)
        replaced = exists(select(newer.c.id).where(newer.c.device_id == snapshots.c.device_id,
                                                   newer.c.id > snapshots.c.id))
        reports = delete_matching(engine, snapshots, (snapshots.c.id <= last) & replaced,
                                  batch=batch, deadline=deadline)
    return entries, reports
