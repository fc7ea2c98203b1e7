"""``/healthz``: is the database reachable and the ingest subscribed."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from controlplane.api.deps import ContextDep
from controlplane.api.schemas import Health

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(context: ContextDep, response: Response) -> Health:
    """``ok`` when both the database and MQTT are up, else ``degraded`` with 503."""
    try:
        with context.engine.connect() as conn:
            conn.execute(select(1))
        database = True
    except SQLAlchemyError as exc:
        log.warning("health check: database unreachable: %s", exc)
        database = False
    mqtt = context.ingest.connected
    healthy = database and mqtt
    if not healthy:
        response.status_code = 503
    leader = context.is_leader() if context.is_leader is not None else None
    return Health(status="ok" if healthy else "degraded", database=database, mqtt=mqtt,
                  leader=leader)
