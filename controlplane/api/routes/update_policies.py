"""``/v1/update-policies`` (defaults by label or profile) and
``POST /v1/devices/{id}/lock-override``.

A default policy (windows, rate cap, metered links) is set for a firmware
profile (``/v1/update-policies/profile/{name}``) or a label
(``/v1/update-policies/label/{key}/{value}``); the director signs a device's
defaults, with a rollout's own policy over them, into each entry it assigns.
The lock override puts an operator's :class:`protocol.LockOverride` into the
device's entry for one model and re-signs its document: it reaches the
device signed, like everything the control plane tells it. Every call that
changes something is in the audit log.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from controlplane import policy_defaults
from controlplane.api.deps import ContextDep, described, not_configured, off_response
from controlplane.api.schemas_policies import (
    LockOverrideOut,
    LockOverrideRequest,
    PolicyDefaultList,
    PolicyDefaultOut,
)
from controlplane.context import AppContext
from controlplane.update_policies import PolicyLayer
from protocol import LockOverride

router = APIRouter(tags=["update-policies"])

#: a label's key and value, or a profile's name: what the devices table holds
Name = Annotated[str, Path(min_length=1, max_length=128)]


def _out(found: policy_defaults.PolicyDefault) -> PolicyDefaultOut:
    return PolicyDefaultOut(selector=found.selector, key=found.key, value=found.value,
                            policy=found.layer, updated_at=found.updated_at)


def _put(context: AppContext, selector: policy_defaults.Selector, key: str, value: str,
         body: PolicyLayer) -> PolicyDefaultOut:
    with context.engine.begin() as conn:
        return _out(policy_defaults.put(conn, selector, key, value, body, time.time()))


def _delete(context: AppContext, selector: policy_defaults.Selector, key: str,
            value: str) -> None:
    with context.engine.begin() as conn:
        if not policy_defaults.remove(conn, selector, key, value):
            what = f"label {key}={value}" if selector == "label" else f"profile {key}"
            raise HTTPException(404, detail=f"no default update policy for {what}")


@router.get("/v1/update-policies", response_model=PolicyDefaultList)
def list_defaults(context: ContextDep) -> PolicyDefaultList:
    """Every default update policy, profiles first, then labels."""
    with context.engine.connect() as conn:
        return PolicyDefaultList(items=[_out(d) for d in policy_defaults.list_all(conn)])


_PUT_ANSWERS = described({422: "bad policy (unknown field, bad cron or time zone, a cap "
                               "under 1024 bytes/s)"})


@router.put("/v1/update-policies/profile/{name}", response_model=PolicyDefaultOut,
            responses=_PUT_ANSWERS)
def put_profile_default(name: Name, body: PolicyLayer, context: ContextDep) -> PolicyDefaultOut:
    """Set the default policy of devices with firmware profile ``name``, for
    assignments made from now on (a rollout's own policy goes over it)."""
    return _put(context, "profile", name, "", body)


@router.put("/v1/update-policies/label/{key}/{value}", response_model=PolicyDefaultOut,
            responses=_PUT_ANSWERS)
def put_label_default(key: Name, value: Name, body: PolicyLayer,
                      context: ContextDep) -> PolicyDefaultOut:
    """Set the default policy of devices labelled ``key=value``, for assignments made
    from now on (over the profile's; a rollout's own policy goes over both)."""
    return _put(context, "label", key, value, body)


@router.delete("/v1/update-policies/profile/{name}", status_code=204,
               responses=described({404: "no default for that profile"}))
def delete_profile_default(name: Name, context: ContextDep) -> None:
    """Remove a profile's default; entries already signed keep the policy they have."""
    _delete(context, "profile", name, "")


@router.delete("/v1/update-policies/label/{key}/{value}", status_code=204,
               responses=described({404: "no default for that label"}))
def delete_label_default(key: Name, value: Name, context: ContextDep) -> None:
    """Remove a label's default; entries already signed keep the policy they have."""
    _delete(context, "label", key, value)


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
