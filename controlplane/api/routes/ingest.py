"""``/v1/ingest/stats``: counters of the MQTT ingest."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from controlplane.api.deps import ContextDep
from controlplane.api.schemas import IngestStats

router = APIRouter(prefix="/v1/ingest", tags=["ingest"])


@router.get("/stats", response_model=IngestStats)
def ingest_stats(context: ContextDep) -> IngestStats:
    """Messages received, written and rejected (by reason) since start-up."""
    snap = context.ingest.stats()
    return IngestStats(**dataclasses.asdict(snap), rejected_total=snap.rejected_total)
