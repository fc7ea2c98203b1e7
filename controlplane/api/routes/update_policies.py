"""``/v1/update-policies`` (defaults by label or profile) and
``POST /v1/devices/{id}/lock-override``.

A default policy (windows, rate cap, metered links) is set for a firmware
profile (``/v1/update-policies/profile/{name}``) or a label
(``/v1/update-policies/label/{key}={value}``); the director signs a device's
defaults, with a rollout's own policy over them, into each entry it assigns.
The lock override puts an operator's :class:`protocol.LockOverride` into the
device's entry for one model and re-signs its document: it reaches the
device signed, like everything the control plane tells it. Every call that
changes something is in the audit log.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from fastapi import APIRouter, HTTPException

from controlplane import policy_defaults
from controlplane.api.deps import ContextDep, described, not_configured, off_response
from controlplane.api.schemas_policies import (
    LockOverrideOut,
    LockOverrideRequest,
    PolicyDefaultList,
    PolicyDefaultOut,
)
from controlplane.update_policies import PolicyLayer
from protocol import LockOverride

router = APIRouter(tags=["update-policies"])

SelectorPath = Literal["label", "profile"]
#: a label's key and value, or a profile's name: what the devices table holds
MAX_NAME = 128


def _out(found: policy_defaults.PolicyDefault) -> PolicyDefaultOut:
    return PolicyDefaultOut(selector=found.selector, key=found.key, value=found.value,
                            policy=found.layer, updated_at=found.updated_at)


def _split(selector: SelectorPath, name: str) -> tuple[str, str]:
    """``(key, value)`` of a label ``key=value`` or a profile ``name``; 400 when malformed."""
    if selector == "label":
        key, sep, value = name.partition("=")
        if not sep or not key or not value:
            raise HTTPException(400, detail={
                "code": "bad_label",
                "message": f"a label default is named key=value, got {name!r}"})
    else:
        key, value = name, ""
    if len(key) > MAX_NAME or len(value) > MAX_NAME:
        raise HTTPException(400, detail={
            "code": "name_too_long", "message": f"keys and values are at most {MAX_NAME} chars"})
    return key, value


@router.get("/v1/update-policies", response_model=PolicyDefaultList)
def list_defaults(context: ContextDep) -> PolicyDefaultList:
    """Every default update policy, profiles first, then labels."""
    with context.engine.connect() as conn:
        return PolicyDefaultList(items=[_out(d) for d in policy_defaults.list_all(conn)])


@router.put(
    "/v1/update-policies/{selector}/{name}",
    response_model=PolicyDefaultOut,
    responses=described({400: "a label default not named key=value",
                         422: "bad policy (unknown field, bad cron or time zone)"}),
)
def put_default(selector: SelectorPath, name: str, body: PolicyLayer,
                context: ContextDep) -> PolicyDefaultOut:
    """Set the default policy of a profile (``name``) or a label (``key=value``).

    Assignments made from now on get it (under a rollout's own policy); an
    empty body is refused: remove the default instead.
    """
    key, value = _split(selector, name)
    if body.is_empty():
        raise HTTPException(400, detail={
            "code": "empty_policy",
            "message": "the policy sets nothing; DELETE the default to remove it"})
    with context.engine.begin() as conn:
        return _out(policy_defaults.put(conn, selector, key, value, body,
                                        time.time()))


@router.delete(
    "/v1/update-policies/{selector}/{name}",
    status_code=204,
    responses=described({400: "a label default not named key=value",
                         404: "no default for that label or profile"}),
)
def delete_default(selector: SelectorPath, name: str, context: ContextDep) -> None:
    """Remove a default; entries already signed keep the policy they were signed with."""
    key, value = _split(selector, name)
    with context.engine.begin() as conn:
        if not policy_defaults.remove(conn, selector, key, value):
            raise HTTPException(404, detail=f"no default update policy for {selector} {name!r}")


@router.post(
    "/v1/devices/{device_id}/lock-override",
    response_model=LockOverrideOut,
    responses={
        **off_response("the director key", also="the device has no entry for that model"),
        **described({409: "the device's agent reads one model (slmfleet.hello/1) and cannot "
                          "read a policy (reason needs_upgrade)"}),
    },
)
def override_lock(device_id: str, body: LockOverrideRequest,
                  context: ContextDep) -> LockOverrideOut:
    """Override the device's update locks for ``model``: locks taken before now no
    longer defer its activation. Signed into the entry and re-published."""
    director = context.director
    if director is None:
        raise not_configured("the lock override needs the director keys; see docs/models.md")
    override = LockOverride(id=f"o-{secrets.token_hex(8)}", issued_at=time.time(),
                            reason=body.reason)
    result = director.override_lock(device_id, body.model, override)
    if result.status == "not_assigned":
        raise HTTPException(404, detail=f"device {device_id!r} has no live entry for "
                                        f"{body.model!r}")
    if result.status != "assigned":
        raise HTTPException(409, detail={"code": result.status, "message": result.reason})
    assert result.assignment_id is not None and result.sequence is not None
    return LockOverrideOut(device_id=device_id, model=body.model,
                           assignment_id=result.assignment_id, override_id=override.id,
                           issued_at=override.issued_at, reason=override.reason,
                           sequence=result.sequence)
