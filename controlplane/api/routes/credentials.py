"""``/v1/devices/{id}/credentials``: enroll a device (its own MQTT password) or revoke it.

Admin only (see ``controlplane.auth.policy``). Enabled when the control
plane manages the broker's password file (``mosquitto_passwd_file``).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from controlplane.api.deps import ContextDep, PrincipalDep, SessionDep
from controlplane.auth.device_credentials import BrokerFiles, EnrollmentOff, enroll, revoke
from protocol import is_valid_device_id

router = APIRouter(prefix="/v1/devices", tags=["credentials"])


class CredentialOut(BaseModel):
    """A device's MQTT credentials record (never the password)."""

    device_id: str
    username: str = Field(description="the MQTT username: the device id")
    created_at: float
    revoked_at: float | None
    broker_reloaded: bool = Field(
        description="the broker was told to re-read its files; false: it applies at its next start"
    )


class EnrollmentOut(CredentialOut):
    """New credentials: ``password`` is shown this once; put it in the agent's config."""

    password: str
    broker_url: str


def _files(context: ContextDep) -> BrokerFiles:
    try:
        return BrokerFiles.from_settings(context.settings)
    except EnrollmentOff as exc:
        raise HTTPException(503, detail=str(exc)) from exc


def _check_id(device_id: str) -> None:
    if not is_valid_device_id(device_id):
        raise HTTPException(
            422, detail=f"invalid device id {device_id!r}: use 1-64 of a-z 0-9 . _ -"
        )


@router.post(
    "/{device_id}/credentials",
    response_model=EnrollmentOut,
    status_code=201,
    responses={
        422: {"description": "not a valid device id"},
        503: {"description": "the control plane does not manage the broker's password file"},
    },
)
def enroll_device(
    device_id: str, session: SessionDep, context: ContextDep, principal: PrincipalDep
) -> EnrollmentOut:
    """Issue the device a new MQTT password (an old one stops working)."""
    _check_id(device_id)
    files = _files(context)
    try:
        done = enroll(session, files, device_id, principal.token_id if principal else None)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    row = done.row
    return EnrollmentOut(
        device_id=row.device_id, username=row.device_id, created_at=row.created_at,
        revoked_at=None, broker_reloaded=done.broker_reloaded, password=done.password,
        broker_url=context.settings.mqtt_url,
    )


@router.delete(
    "/{device_id}/credentials",
    response_model=CredentialOut,
    responses={
        404: {"description": "the device was never enrolled"},
        503: {"description": "the control plane does not manage the broker's password file"},
    },
)
def revoke_device(device_id: str, session: SessionDep, context: ContextDep) -> CredentialOut:
    """Revoke the device's MQTT credentials: the broker refuses its next connection."""
    files = _files(context)
    try:
        row, reloaded = revoke(session, files, device_id)
    except KeyError as exc:
        raise HTTPException(404, detail=f"device {device_id!r} was never enrolled") from exc
    return CredentialOut(
        device_id=row.device_id, username=row.device_id, created_at=row.created_at,
        revoked_at=row.revoked_at, broker_reloaded=reloaded,
    )
