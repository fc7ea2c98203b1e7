"""``/v1/devices/{id}/assignment`` and ``/history``: the operator's direct lever.

``POST /v1/devices/{id}/assignment`` pins one device's model ``model`` to
``model@version``, leaving its other models as they are; with ``*`` as the
id and a ``selector`` in the body it pins every matching device. The
director picks each device's variant (its own tier, else the highest below
it), signs the device's whole document, stores and publishes.
``DELETE /v1/devices/{id}/assignment/{model}`` takes one model off the
device (a new document without it); ``DELETE /v1/devices/{id}/assignment``
revokes every model's assignment and clears its retained ``desired``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from controlplane.api.deps import ContextDep, SessionDep, described, not_configured, off_response
from controlplane.api.pagination import PageDep
from controlplane.api.schemas_registry import (
    AssignRequest,
    AssignResponse,
    AssignResultOut,
    HistoryItem,
    HistoryPage,
)
from controlplane.context import AppContext
from controlplane.db import queries
from controlplane.db.history import TimelineKey, device_timeline
from controlplane.director import Director, UnknownRelease
from protocol import ProtocolError

router = APIRouter(prefix="/v1/devices", tags=["assignments"])

#: the path id that means "the devices the selector matches"
ALL = "*"
#: devices one selector call may assign
MAX_SELECTED = 100_000

DIRECTOR_OFF = (
    "assignments are off: set director_keys_file (the director key list agents pin) and "
    "director_key_files (the private director keys); see docs/models.md"
)


def _director(context: AppContext) -> Director:
    if context.director is None:
        raise not_configured(DIRECTOR_OFF)
    return context.director


def _targets(device_id: str, body: AssignRequest, context: AppContext) -> list[str]:
    if device_id != ALL:
        if body.selector is not None:
            raise HTTPException(
                422, detail=f"a selector assigns many devices: POST /v1/devices/{ALL}/assignment"
            )
        return [device_id]
    sel = body.selector
    if sel is None or sel.is_empty():
        raise HTTPException(
            422, detail="give a selector with at least one of tiers, profiles, labels, device_ids"
        )
    selector = queries.DeviceSelector(
        tiers=[t.value for t in sel.tiers or []],
        profiles=sel.profiles or [],
        labels=sorted((sel.labels or {}).items()),
        device_ids=sel.device_ids or [],
    )
    with context.sessions() as session:
        found = queries.select_device_ids(session, selector, limit=MAX_SELECTED)
        # A named device that does not exist is reported (the director answers
        # unknown_device); one that exists but fails another criterion is not.
        named = set(sel.device_ids or ()) - set(found)
        existing = set(
            queries.select_device_ids(
                session, queries.DeviceSelector(device_ids=sorted(named)), limit=len(named)
            )
        ) if named else set()
    return found + sorted(named - existing)


@router.post(
    "/{device_id}/assignment",
    response_model=AssignResponse,
    responses={
        **off_response("the director key", also="no such device (single device) or release"),
        **described({
            409: "the device has no variant it can run, or its agent reads one model and "
                 "runs another (status needs_upgrade; single device)",
            422: "bad body or selector",
        }),
    },
)
def assign(device_id: str, body: AssignRequest, context: ContextDep) -> AssignResponse:
    """Pin a device's model (or, with id `*`, every matching device's) to a release.

    Only the entry of the release's model name changes; the device's other
    models keep theirs.
    """
    director = _director(context)
    targets = _targets(device_id, body, context)
    try:
        results = director.assign(targets, body.model, body.version)
    except UnknownRelease as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    except ProtocolError as exc:
        # The stored release no longer verifies (the release keys were rotated).
        raise HTTPException(409, detail={"reason": exc.reason, "message": str(exc)}) from exc
    out = [AssignResultOut.model_validate(r) for r in results]
    if device_id != ALL:
        result = out[0]
        if result.status == "unknown_device":
            raise HTTPException(404, detail=result.model_dump())
        if result.status in ("incompatible", "needs_upgrade"):
            raise HTTPException(409, detail=result.model_dump())
    return AssignResponse(
        model=body.model,
        version=body.version,
        results=out,
        assigned=sum(r.status == "assigned" for r in out),
        incompatible=sum(r.status == "incompatible" for r in out),
        unknown=sum(r.status == "unknown_device" for r in out),
        needs_upgrade=sum(r.status == "needs_upgrade" for r in out),
    )


@router.delete(
    "/{device_id}/assignment",
    response_model=AssignResultOut,
    responses=off_response("the director key", also="the device has no live assignment"),
)
def unassign(device_id: str, context: ContextDep) -> AssignResultOut:
    """Revoke the device's assignment: its retained `desired` is cleared; it keeps its model."""
    director = _director(context)
    result = AssignResultOut.model_validate(director.unassign([device_id])[0])
    if result.status != "unassigned":
        raise HTTPException(404, detail=f"device {device_id!r} has no live assignment")
    return result


@router.delete(
    "/{device_id}/assignment/{model}",
    response_model=AssignResultOut,
    responses=off_response("the director key", also="the device has no live assignment of it"),
)
def remove_model(device_id: str, model: str, context: ContextDep) -> AssignResultOut:
    """Take one model off the device: its next document leaves the model out.

    The device's other models keep their entries. An agent reading sets
    unloads the model; a device in the old form with no model left has its
    `desired` cleared.
    """
    director = _director(context)
    result = AssignResultOut.model_validate(director.remove([device_id], model)[0])
    if result.status != "unassigned":
        raise HTTPException(404, detail=f"device {device_id!r} has no live assignment of {model!r}")
    return result


@router.get(
    "/{device_id}/history",
    response_model=HistoryPage,
    responses=described({404: "no such device"}),
)
def history(device_id: str, session: SessionDep, page: PageDep,
            model: Annotated[str | None, Query(
                description="only this model name's assignments and its events")] = None,
            ) -> HistoryPage:
    """The device's timeline, oldest first: assignments issued and revoked, and its events."""
    if queries.get_device(session, device_id) is None:
        raise HTTPException(404, detail=f"device {device_id!r} not found")
    entries = device_timeline(
        session, device_id, after=page.after(TimelineKey.decode), limit=page.fetch, model=model
    )
    served, after = page.cut(entries, lambda e: e.key.encode())
    return HistoryPage(
        items=[HistoryItem(ts=e.key.ts, kind=e.kind, type=e.type, **e.fields) for e in served],
        next=after,
    )
