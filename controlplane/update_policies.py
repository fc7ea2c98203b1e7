"""Update-policy layers and how they combine into the policy an entry is signed with.

A device's default policy may come from its firmware profile and from its
labels (:mod:`.policy_defaults`); a rollout may carry its own
(:class:`controlplane.rollouts.RolloutSpec`). Each is a :class:`PolicyLayer`:
every field optional, ``None`` meaning "not said here". The effective policy
of an entry is the layers applied in order, each field taken from the last
layer that sets it (profile, then labels, then the rollout), and it travels
to the device inside the director-signed entry as a
:class:`protocol.UpdatePolicy`. Pure: no database, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from protocol import LockOverride, UpdatePolicy, Window

#: the fields a layer may set (a lock override is an operator's action, never a default)
LAYER_FIELDS = ("download_window", "activation_window", "max_bytes_per_s", "allow_metered")


class PolicyLayer(BaseModel):
    """One source's say on a device's update policy; unset fields leave it to others."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: downloads wait outside it (``waiting_window``)
    download_window: Window | None = None
    #: a staged candidate waits for it before activating
    activation_window: Window | None = None
    #: the download's rate cap, bytes per second
    max_bytes_per_s: Annotated[int, Field(strict=True, ge=1024)] | None = None
    #: may the download run over a link the device reports as metered
    allow_metered: Annotated[bool, Field(strict=True)] | None = None

    def is_empty(self) -> bool:
        """True when the layer sets nothing."""
        return all(getattr(self, name) is None for name in LAYER_FIELDS)


def layer_of(fields: object) -> PolicyLayer:
    """The :class:`PolicyLayer` of any object carrying the layer's fields (a rollout spec)."""
    return PolicyLayer(**{name: getattr(fields, name, None) for name in LAYER_FIELDS})


def effective(layers: Iterable[PolicyLayer | None],
              lock_override: LockOverride | None = None) -> UpdatePolicy | None:
    """The policy ``layers`` make, later layers winning field by field; None when
    no layer sets anything and there is no ``lock_override``."""
    merged: dict[str, object] = {}
    for layer in layers:
        if layer is None:
            continue
        for name in LAYER_FIELDS:
            value = getattr(layer, name)
            if value is not None:
                merged[name] = value
    if not merged and lock_override is None:
        return None
    return UpdatePolicy(**merged, lock_override=lock_override)  # type: ignore[arg-type]


def with_lock_override(policy: UpdatePolicy | None, override: LockOverride) -> UpdatePolicy:
    """``policy`` (None: the empty policy) with ``override`` in place of any earlier one."""
    base = policy or UpdatePolicy()
    return base.model_copy(update={"lock_override": override})


def stored(policy: UpdatePolicy | None) -> dict[str, object] | None:
    """``policy`` as the ``assignments.policy`` column keeps it."""
    return None if policy is None else policy.model_dump(mode="json", exclude_none=True)


def loaded(data: dict[str, object] | None) -> UpdatePolicy | None:
    """The policy the ``assignments.policy`` column holds."""
    return None if data is None else UpdatePolicy.model_validate(data)
