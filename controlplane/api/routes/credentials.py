"""``/v1/devices/{id}/credentials``: enroll a device (its own MQTT password) or revoke it.

Admin only (see ``controlplane.auth.policy``). Enabled when the control
plane manages the broker's password file (``mosquitto_passwd_file``);
without it both routes answer 404 naming the settings.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from controlplane.api.deps import (
    ContextDep,
    PrincipalDep,
    SessionDep,
    described,
    not_configured,
    off_response,
)
from controlplane.api.schemas_auth import CredentialOut, EnrollmentOut
from controlplane.auth.device_credentials import BrokerFiles, EnrollmentOff, enroll, revoke
from controlplane.auth.tables import DeviceCredential
from protocol import DEVICE_ID_PATTERN, is_valid_device_id

router = APIRouter(prefix="/v1/devices", tags=["credentials"])

#: "device credentials" in the documented 404s
_OFF = "device enrollment (mosquitto_passwd_file, mosquitto_acl_file)"

DeviceIdPath = Annotated[
    str,
    Path(
        description="the device id, which is also its MQTT username",
        # Documented, checked by _check_id: its 422 spells the rule out.
        json_schema_extra={"pattern": DEVICE_ID_PATTERN},
    ),
]


def _files(context: ContextDep) -> BrokerFiles:
    try:
        return BrokerFiles.from_settings(context.settings)
    except EnrollmentOff as exc:
        raise not_configured(str(exc)) from exc


def _check_id(device_id: str) -> None:
    if not is_valid_device_id(device_id):
        raise HTTPException(
            422, detail=f"invalid device id {device_id!r}: use 1-64 of a-z 0-9 . _ -"
        )


def _record(row: DeviceCredential, broker_reloaded: bool) -> dict[str, object]:
    return {
        "device_id": row.device_id, "username": row.device_id, "created_at": row.created_at,
        "revoked_at": row.revoked_at, "broker_reloaded": broker_reloaded,
    }


@router.post(
    "/{device_id}/credentials",
    response_model=EnrollmentOut,
    status_code=201,
    responses=described({422: "not a valid device id"}, off_response(_OFF)),
)
def enroll_device(
    device_id: DeviceIdPath, session: SessionDep, context: ContextDep, principal: PrincipalDep
) -> EnrollmentOut:
    """Issue the device a new MQTT password (an old one stops working)."""
    _check_id(device_id)
    files = _files(context)
    try:
        done = enroll(session, files, device_id, principal.token_id if principal else None)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    return EnrollmentOut(
        **_record(done.row, done.broker_reloaded), password=done.password,
        broker_url=context.settings.mqtt_url,
    )


@router.delete(
    "/{device_id}/credentials",
    response_model=CredentialOut,
    responses=off_response(_OFF, also="the device was never enrolled"),
)
def revoke_device(device_id: str, session: SessionDep, context: ContextDep) -> CredentialOut:
    """Revoke the device's MQTT credentials: the broker refuses its next connection."""
    files = _files(context)
    try:
        row, reloaded = revoke(session, files, device_id)
    except KeyError as exc:
        raise HTTPException(404, detail=f"device {device_id!r} was never enrolled") from exc
    return CredentialOut(**_record(row, reloaded))
