"""Does a whole desired set fit this device? Checked before any of it downloads.

:func:`protocol.set_fit_check` does the arithmetic; this module measures
the device for it:

- **RAM**: the figure a single model's check uses
  (:func:`agent.update.staging.ram_budget`: total less the OS reserve, or
  the cgroup limit less the agent's own use), for the models that stay
  loaded together at most (the agent's ``max_loaded_models``, the largest
  ones; all with no cap), each with a KV cache per slot, plus room for one
  warm-swap candidate: the largest model whose version changes while its
  old version keeps serving.
- **Disk**: free space on the models' filesystem, plus what the partial
  downloads of this set already hold, plus what garbage collection could
  delete (every version no pointer names and no pending update needs),
  against every artifact not yet installed, with staging.

A set that does not fit is refused as a whole, with these figures in the
reason; the same models checked one at a time may each fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from protocol import Capabilities, SetMember, VerifiedEntry, set_fit_check

from ..cgroup import memory_limit_bytes
from ..disk import disk_free_bytes
from ..errors import StoreError
from ..profiles import FirmwareProfile
from .folder import held_bytes
from .staging import DiskFit, ram_budget, reclaimable_bytes, slots_for
from .stores import ModelStores


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One model of the set, as the fit check sees it."""

    name: str
    #: its store key (``name@version-tier``)
    key: str
    entry: VerifiedEntry


def _installed(stores: ModelStores, name: str, key: str) -> bool:
    try:
        return stores.store(name).version(key) is not None
    except StoreError:
        return False


def _active_key(stores: ModelStores, name: str) -> str | None:
    try:
        active = stores.store(name).active()
    except StoreError:
        return None
    return active.key if active is not None else None


def set_fit(
    stores: ModelStores,
    planned: Iterable[PlannedEntry],
    *,
    capabilities: Capabilities,
    profile: FirmwareProfile,
    max_loaded: int | None,
    protect: Mapping[str, Iterable[str]] = {},
    memory_limit: Callable[[], int | None] = memory_limit_bytes,
) -> DiskFit:
    """Run :func:`protocol.set_fit_check` over ``planned`` with this device's figures.

    ``protect`` names the versions pending updates still need (not counted
    as reclaimable). Blocking only briefly (a statvfs and a few stats).
    """
    members, held = [], 0
    for plan in planned:
        store = stores.store(plan.name)
        download = not _installed(stores, plan.name, plan.key)
        active = _active_key(stores, plan.name)
        if download:
            held += held_bytes(store.staging_path(plan.key))
        members.append(SetMember(
            name=plan.name,
            variant=plan.entry.variant,
            slots=slots_for(plan.entry.variant, profile),
            download=download,
            swaps=active is not None and active != plan.key,
        ))
    stores.root.mkdir(parents=True, exist_ok=True)
    free = disk_free_bytes(stores.root)
    reclaimable = sum(reclaimable_bytes(store, protect.get(name, ()))
                      for name, store in stores.all())
    ram, reserved = ram_budget(capabilities, profile, memory_limit)
    result = set_fit_check(
        members,
        ram_bytes=ram,
        disk_free_bytes=free + held + reclaimable,
        os_reserved_bytes=reserved,
        max_loaded=max_loaded,
    )
    return DiskFit(result, result.ok and free + held < result.disk_needed_bytes)
