"""Why a device's update waits, and until when, as ``GET /v1/devices/{id}`` shows it.

For each live entry, the latest event the device reported for its
assignment id: a waiting one (``waiting_window``, ``waiting_network``,
``deferred``, or ``staged`` deferred) says what the update waits for; the
first ISO 8601 time in its reason, how long (agents name the next opening).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controlplane.api.schemas_policies import WaitingOut
from controlplane.db.history import LiveAssignment
from controlplane.db.models import DeviceEvent
from controlplane.rollouts.outcome import ReportedEvent, is_waiting
from controlplane.rollouts.waiting import waiting_until


def device_waiting(session: Session, device_id: str,
                   live: Mapping[str, LiveAssignment]) -> list[WaitingOut]:
    """The device's entries whose update waits on the device, by model name."""
    by_id = {a.assignment_id: name for name, a in live.items()}
    if not by_id:
        return []
    latest = (select(DeviceEvent.assignment_id, func.max(DeviceEvent.id).label("id"))
              .where(DeviceEvent.device_id == device_id,
                     DeviceEvent.assignment_id.in_(list(by_id)))
              .group_by(DeviceEvent.assignment_id).subquery())
    rows = session.execute(
        select(DeviceEvent.assignment_id, DeviceEvent.type, DeviceEvent.code,
               DeviceEvent.reason, DeviceEvent.ts)
        .join(latest, DeviceEvent.id == latest.c.id)
    ).all()
    found = []
    for row in rows:
        if not is_waiting(ReportedEvent(row.assignment_id, row.type, row.code, row.reason)):
            continue
        found.append(WaitingOut(model=by_id[row.assignment_id], assignment_id=row.assignment_id,
                                type=row.type, code=row.code, reason=row.reason, since=row.ts,
                                until=waiting_until(row.reason)))
    return sorted(found, key=lambda w: w.model)
