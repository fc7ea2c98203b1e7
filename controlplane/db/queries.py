"""Read queries over the device registry, shared by the API and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Exists, func, select
from sqlalchemy.orm import Session

from .models import Device, DeviceLabel, TelemetryRow


@dataclass(frozen=True)
class DeviceFilter:
    """Devices matching every given criterion; every ``(key, value)`` label must match."""

    tier: str | None = None
    profile: str | None = None
    online: bool | None = None
    labels: Sequence[tuple[str, str]] = ()
    #: ``single`` or ``set``: the desired-state form the device's agent reads
    assignment_form: str | None = None


def _has_label(key: str, value: str) -> Exists:
    """The device (correlated on ``Device.id``) carries label ``key=value``."""
    return (
        select(DeviceLabel.device_id)
        .where(
            DeviceLabel.device_id == Device.id,
            DeviceLabel.key == key,
            DeviceLabel.value == value,
        )
        .exists()
    )


def list_devices(
    session: Session, flt: DeviceFilter, *, after: str | None, limit: int
) -> Sequence[Device]:
    """Up to ``limit`` devices matching ``flt`` with an id above ``after``, by id.

    Keyset pagination: the id of the last device of a page is where the next
    one starts, so pages stay stable while devices are added.
    """
    query = select(Device).order_by(Device.id).limit(limit)
    if after is not None:
        query = query.where(Device.id > after)
    if flt.tier is not None:
        query = query.where(Device.tier == flt.tier)
    if flt.profile is not None:
        query = query.where(Device.profile == flt.profile)
    if flt.online is not None:
        query = query.where(Device.online.is_(flt.online))
    if flt.assignment_form is not None:
        query = query.where(Device.assignment_form == flt.assignment_form)
    for key, value in flt.labels:
        query = query.where(_has_label(key, value))
    return session.scalars(query).all()


def get_device(session: Session, device_id: str) -> Device | None:
    """The device with id ``device_id``, or None."""
    return session.get(Device, device_id)


def recent_telemetry(session: Session, device_id: str, limit: int) -> Sequence[TelemetryRow]:
    """The device's ``limit`` newest heartbeats, newest first."""
    return session.scalars(
        select(TelemetryRow)
        .where(TelemetryRow.device_id == device_id)
        .order_by(TelemetryRow.ts.desc(), TelemetryRow.id.desc())
        .limit(limit)
    ).all()


def count_devices_by_form(session: Session) -> list[tuple[str, int]]:
    """``(assignment_form, count)``: how many devices read each desired-state form."""
    rows = session.execute(
        select(Device.assignment_form, func.count()).group_by(Device.assignment_form)
    ).all()
    return [(form, int(count)) for form, count in rows]


def count_devices_by_tier_and_state(session: Session) -> list[tuple[str | None, bool, int]]:
    """``(tier, online, count)`` for every combination present."""
    rows = session.execute(
        select(Device.tier, Device.online, func.count()).group_by(Device.tier, Device.online)
    ).all()
    return [(tier, bool(online), int(count)) for tier, online, count in rows]


@dataclass(frozen=True)
class DeviceSelector:
    """Devices for a bulk assignment: every given criterion must match; list values: any."""

    tiers: Sequence[str] = ()
    profiles: Sequence[str] = ()
    labels: Sequence[tuple[str, str]] = ()
    device_ids: Sequence[str] = ()


def select_device_ids(session: Session, sel: DeviceSelector, *, limit: int) -> list[str]:
    """Ids of up to ``limit`` devices matching ``sel``, by id."""
    query = select(Device.id).order_by(Device.id).limit(limit)
    if sel.tiers:
        query = query.where(Device.tier.in_(sel.tiers))
    if sel.profiles:
        query = query.where(Device.profile.in_(sel.profiles))
    if sel.device_ids:
        query = query.where(Device.id.in_(sel.device_ids))
    for key, value in sel.labels:
        query = query.where(_has_label(key, value))
    return list(session.scalars(query).all())
