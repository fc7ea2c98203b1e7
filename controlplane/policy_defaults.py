"""Default update policies carried by a device label or a firmware profile.

An operator sets a :class:`controlplane.update_policies.PolicyLayer` for a
profile (``selector`` ``profile``, ``key`` the profile's name) or for a label
(``selector`` ``label``, ``key=value``). When the director assigns a model
to a device, the device's defaults come first (its profile's, then each
matching label's in key order), a rollout's own policy over them
(:func:`controlplane.update_policies.effective`). Defaults apply to
assignments made after they are set; entries already signed keep theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, delete, select, update

from protocol import UpdatePolicy

from .db.models import Device, DeviceLabel
from .db.policy_tables import UpdatePolicyDefault
from .db.writes import insert_ignoring_conflicts
from .update_policies import PolicyLayer, effective

Selector = Literal["label", "profile"]
#: ids per statement where a list of device ids is bound
CHUNK = 1000

_table = UpdatePolicyDefault.__table__


@dataclass(frozen=True, slots=True)
class PolicyDefault:
    """One stored default: what it applies to and what it says."""

    selector: Selector
    key: str
    value: str
    layer: PolicyLayer
    updated_at: float

    @property
    def applies_to(self) -> str:
        """``label key=value`` or ``profile name``, for people."""
        return f"label {self.key}={self.value}" if self.selector == "label" \
            else f"profile {self.key}"


def _of(row: UpdatePolicyDefault) -> PolicyDefault:
    return PolicyDefault(row.selector, row.key, row.value,  # type: ignore[arg-type]
                         PolicyLayer.model_validate(row.policy), row.updated_at)


def put(conn: Connection, selector: Selector, key: str, value: str, layer: PolicyLayer,
        now: float) -> PolicyDefault:
    """Set the default for ``selector`` ``key`` (``value``: a label's value, ``""``
    for a profile), replacing any earlier one."""
    policy = layer.model_dump(mode="json", exclude_none=True)
    conn.execute(insert_ignoring_conflicts(conn.dialect.name, _table,
                                           ["selector", "key", "value"]),
                 [{"selector": selector, "key": key, "value": value, "policy": policy,
                   "updated_at": now}])
    conn.execute(update(_table).where(_table.c.selector == selector, _table.c.key == key,
                                      _table.c.value == value)
                 .values(policy=policy, updated_at=now))
    return PolicyDefault(selector, key, value, layer, now)


def remove(conn: Connection, selector: Selector, key: str, value: str) -> bool:
    """Drop a default; False when there was none."""
    done = conn.execute(delete(_table).where(_table.c.selector == selector,
                                             _table.c.key == key, _table.c.value == value))
    return bool(done.rowcount)


def list_all(conn: Connection) -> list[PolicyDefault]:
    """Every default, profiles first, then labels, each by key and value."""
    rows = conn.execute(select(_table).order_by(
        _table.c.selector.desc(), _table.c.key, _table.c.value)).all()
    return [_of(row) for row in rows]  # type: ignore[arg-type]


def layers_for(conn: Connection, device_ids: Sequence[str]) -> dict[str, list[PolicyLayer]]:
    """Each device's default layers in the order they apply (profile, then labels by
    key); devices without any are left out. Two reads whatever the fleet's size."""
    defaults = list_all(conn)
    if not defaults:
        return {}
    by_profile = {d.key: d.layer for d in defaults if d.selector == "profile"}
    by_label = {(d.key, d.value): d.layer for d in defaults if d.selector == "label"}
    found: dict[str, list[PolicyLayer]] = {}
    for start in range(0, len(device_ids), CHUNK):
        chunk = device_ids[start : start + CHUNK]
        if by_profile:
            for device_id, profile in conn.execute(
                select(Device.id, Device.profile).where(Device.id.in_(chunk),
                                                        Device.profile.in_(list(by_profile)))
            ):
                found.setdefault(device_id, []).append(by_profile[profile])
        if by_label:
            for device_id, key, value in conn.execute(
                select(DeviceLabel.device_id, DeviceLabel.key, DeviceLabel.value)
                .where(DeviceLabel.device_id.in_(chunk),
                       DeviceLabel.key.in_(sorted({k for k, _ in by_label})))
                .order_by(DeviceLabel.device_id, DeviceLabel.key)
            ):
                layer = by_label.get((key, value))
                if layer is not None:
                    found.setdefault(device_id, []).append(layer)
    return found


def policies_for(conn: Connection, device_ids: Sequence[str],
                 own: PolicyLayer | None) -> dict[str, UpdatePolicy | None]:
    """Each device's effective policy: its defaults, ``own`` (a rollout's) over them."""
    defaults = layers_for(conn, device_ids)
    return {d: effective([*defaults.get(d, ()), own]) for d in device_ids}
