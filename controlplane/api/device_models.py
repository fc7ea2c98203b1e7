"""A device's models as ``GET /v1/devices/{id}`` shows them: one view per model name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.api.schemas import DeviceModel
from controlplane.api.schemas_registry import AssignmentSummary
from controlplane.db.history import LiveAssignment
from controlplane.db.models import Device

#: update states that end an update without the assigned version running
FAILED_UPDATES = frozenset({"rejected", "failed", "rolled_back"})


def _state(device: Device, active: Mapping[str, Any] | None, live: LiveAssignment | None,
           update: Mapping[str, Any] | None) -> str:
    if live is None:
        # A set names every model the device should run: one it left out is on its
        # way off. The old form has no way to say so: the model is just not managed.
        return "removing" if device.assignment_form == "set" else "unmanaged"
    if active is not None and f"{active.get('name')}@{active.get('version')}" == live.ref:
        return "inactive" if active.get("inactive") else "serving"
    if (update is not None and update.get("assignment_id") == live.assignment_id
            and update.get("state") in FAILED_UPDATES):
        return "failed"
    return "updating"


def device_models(device: Device, live: Mapping[str, LiveAssignment]) -> dict[str, DeviceModel]:
    """Every model name ``device`` reports active or is assigned, by name."""
    active_models: Mapping[str, Any] = device.models or {}
    updates: Mapping[str, Any] = device.model_updates or {}
    views: dict[str, DeviceModel] = {}
    for name in sorted(set(active_models) | set(live)):
        active, assigned, update = active_models.get(name), live.get(name), updates.get(name)
        views[name] = DeviceModel(
            name=name,
            version=active.get("version") if active else None,
            tier=(active or {}).get("tier") or (assigned.tier if assigned else None),
            sha256=active.get("sha256") if active else None,
            state=_state(device, active, assigned, update),  # type: ignore[arg-type]
            assignment=AssignmentSummary.model_validate(assigned) if assigned else None,
            update=update,
            reason=active.get("inactive") if active else None,
        )
    return views
