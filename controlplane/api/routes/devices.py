"""``/v1/devices``: the device registry."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query

from controlplane.api.deps import SessionDep, described
from controlplane.api.device_models import device_models
from controlplane.api.device_waiting import device_waiting
from controlplane.api.pagination import PageDep, query_error
from controlplane.api.schemas import DeviceDetail, DevicePage, DeviceSummary, TelemetryPoint
from controlplane.api.schemas_registry import AssignmentSummary
from controlplane.db import queries
from controlplane.db.history import current_assignments
from protocol import Tier

router = APIRouter(prefix="/v1/devices", tags=["devices"])

RECENT_TELEMETRY = 20
#: a label filter: a key (no "=") then "=" and any value, "=" included
LABEL_FILTER_PATTERN = "^[^=]+="


def parse_labels(raw: list[str]) -> tuple[tuple[str, str], ...]:
    """``["k=v", ...]`` as pairs; a 422 for an entry without ``=`` or key."""
    pairs = []
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise query_error("label", "label filters look like key=value", item)
        pairs.append((key, value))
    return tuple(pairs)


@router.get("", response_model=DevicePage)
def list_devices(
    session: SessionDep,
    page: PageDep,
    tier: Tier | None = None,
    profile: str | None = None,
    online: bool | None = None,
    assignment_form: Annotated[Literal["single", "set"] | None, Query(
        description="single: agents that read one model (slmfleet.hello/1); set: sets")] = None,
    label: Annotated[
        list[str] | None,
        Query(
            description="key=value; repeat for several, all must match",
            # Documented, checked by parse_labels: its 422 says what a label filter is.
            json_schema_extra={"items": {"type": "string", "pattern": LABEL_FILTER_PATTERN}},
        ),
    ] = None,
) -> DevicePage:
    """Devices matching every filter, ordered by id, one page at a time."""
    flt = queries.DeviceFilter(
        tier=tier.value if tier else None,
        profile=profile,
        online=online,
        labels=parse_labels(label or []),
        assignment_form=assignment_form,
    )
    rows = queries.list_devices(session, flt, after=page.after(), limit=page.fetch)
    served, after = page.cut(rows, lambda d: d.id)
    return DevicePage(items=[DeviceSummary.model_validate(d) for d in served], next=after)


@router.get(
    "/{device_id}",
    response_model=DeviceDetail,
    responses=described({404: "no such device"}),
)
def get_device(device_id: str, session: SessionDep) -> DeviceDetail:
    """One device: latest capabilities, recent telemetry, update state and live assignment."""
    device = queries.get_device(session, device_id)
    if device is None:
        raise HTTPException(status_code=404, detail=f"device {device_id!r} not found")
    telemetry = queries.recent_telemetry(session, device_id, RECENT_TELEMETRY)
    live = current_assignments(session, device_id)
    last = next(iter(live.values()), None)
    return DeviceDetail(
        **DeviceSummary.model_validate(device).model_dump(exclude={"models"}),
        capabilities=device.latest_capabilities,
        runtimes=device.latest_runtimes,
        recent_telemetry=[TelemetryPoint.model_validate(t) for t in telemetry],
        update=device.update_status,
        assignment=AssignmentSummary.model_validate(last) if last else None,
        models=device_models(device, live),
        waiting=device_waiting(session, device_id, live),
    )
