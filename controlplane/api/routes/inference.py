"""Inference metrics the agents report, summed: per device, and per model version and tier.

The rollout gates read the same sums (:mod:`controlplane.db.telemetry_aggregates`),
so these routes show an operator exactly what a gate judged.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import select

from controlplane.api.deps import SessionDep, described
from controlplane.api.schemas_rollouts import DeviceMetrics, VersionMetrics
from controlplane.db import queries, telemetry_aggregates
from controlplane.db.models import ModelVersion

router = APIRouter(tags=["metrics"])

#: the default window: the last hour
DEFAULT_WINDOW_S = 3600.0
#: the longest window one call may ask for: 30 days
MAX_WINDOW_S = 30 * 86_400.0

WindowQuery = Annotated[
    float,
    Query(gt=0, le=MAX_WINDOW_S, description="seconds back from now to sum over"),
]


@router.get(
    "/v1/devices/{device_id}/metrics",
    response_model=DeviceMetrics,
    responses=described({404: "no such device"}),
)
def device_metrics(
    device_id: str, session: SessionDep, window_s: WindowQuery = DEFAULT_WINDOW_S
) -> DeviceMetrics:
    """The device's inference figures per model version over the window."""
    if queries.get_device(session, device_id) is None:
        raise HTTPException(404, detail=f"device {device_id!r} not found")
    since = time.time() - window_s
    found = telemetry_aggregates.device_metrics(session, device_id, since=since)
    return DeviceMetrics(device_id=device_id, since=since, items=[a.public() for a in found])


@router.get(
    "/v1/models/{name}/versions/{version}/metrics",
    response_model=VersionMetrics,
    responses=described({404: "no such release"}),
)
def version_metrics(
    name: str, version: str, session: SessionDep, window_s: WindowQuery = DEFAULT_WINDOW_S
) -> VersionMetrics:
    """The release's inference figures per device tier over the window, summed over devices."""
    exists = session.execute(
        select(ModelVersion.id).where(ModelVersion.model_name == name,
                                      ModelVersion.version == version)
    ).first()
    if exists is None:
        raise HTTPException(404, detail=f"{name}@{version} is not registered")
    since = time.time() - window_s
    found = telemetry_aggregates.version_metrics(session, name, version, since=since)
    return VersionMetrics(model=name, version=version, since=since,
                          tiers=[a.public() for a in found])
