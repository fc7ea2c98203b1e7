"""Will this variant fit this device? The check the agent runs before downloading.

DESIGN.md "Tiers and firmware profiles": disk for the artifact plus staging,
RAM for the weights plus the KV cache at the variant's context. Pure
arithmetic over the manifest and measured numbers; deliberately conservative,
because a model that does not fit fails late (OOM in the worker) and the
manifest can always state the real figure in ``min_ram_bytes``.

The estimates, in order of preference:

* **RAM** -- the manifest's ``min_ram_bytes`` when the release states it: the
  release author's measured peak RSS at the runtime context, which already
  includes the KV cache and runtime overhead. Otherwise
  ``size_bytes * 1.2`` (weights resident, plus runtime buffers) plus a KV
  cache allowance (:func:`kv_cache_allowance_bytes`).
* **KV cache** -- exactly ``2 (K and V) * n_layers * kv_dim * context *
  bytes_per_element``, but layer count and KV width live in the model file,
  not the manifest. With ``P ~= 12 * n_layers * d**2`` parameters, f16
  elements and no grouped-query attention, ``4 * n_layers * d`` bytes per
  token is ``4 * sqrt(n_layers * P / 12)``, which stays below
  ``8 * sqrt(P)`` for ``n_layers <= 48``. So the allowance is
  ``8 * sqrt(parameters)`` bytes per token of runtime context: about 93 KB
  per token for a 135M model (real: ~23 KB), 670 KB for 7B (real without
  GQA: 512 KiB). Models with grouped-query attention need far less; state
  ``min_ram_bytes`` for those.
* **Slots** -- a device that decodes several generations at once
  (``runtime.parallel``) holds one KV cache per slot: each slot past the
  first adds one more KV-cache allowance, on top of ``min_ram_bytes`` too
  (the release author measured one caller).
* **Disk** -- ``size_bytes * staging_factor`` (the partial download and the
  verified copy in the versioned store can exist at once), or the
  manifest's ``min_disk_bytes`` if larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .manifest import Variant

#: resident weights plus runtime buffers, when the manifest states no RAM figure
WEIGHTS_OVERHEAD_FACTOR = 1.2
#: upper bound of f16 KV-cache bytes per token per sqrt(parameter count)
KV_BYTES_PER_TOKEN_PER_SQRT_PARAM = 8
#: download in progress + verified copy in the store
DEFAULT_STAGING_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class FitResult:
    """Outcome of :func:`fit_check`; ``reason`` is ``ok``, ``insufficient_ram`` or
    ``insufficient_disk`` (RAM is reported first: deleting files cannot fix it)."""

    ok: bool
    reason: str
    ram_needed_bytes: int
    disk_needed_bytes: int
    detail: str


def kv_cache_allowance_bytes(parameters: int, context: int) -> int:
    """Conservative KV-cache bytes for a model of ``parameters`` at ``context`` tokens."""
    if parameters < 1 or context < 1:
        raise ValueError("parameters and context must be positive")
    return KV_BYTES_PER_TOKEN_PER_SQRT_PARAM * (math.isqrt(parameters) + 1) * context


def ram_needed_bytes(variant: Variant, slots: int = 1) -> int:
    """RAM the variant needs serving ``slots`` callers at once: its stated
    ``min_ram_bytes`` or the estimate above, plus a KV cache per extra slot."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    kv_cache = kv_cache_allowance_bytes(variant.parameters, variant.runtime_context)
    extra = (slots - 1) * kv_cache
    if variant.min_ram_bytes is not None:
        return variant.min_ram_bytes + extra
    return math.ceil(variant.size_bytes * WEIGHTS_OVERHEAD_FACTOR) + kv_cache + extra


def disk_needed_bytes(variant: Variant, staging_factor: float = DEFAULT_STAGING_FACTOR) -> int:
    """Free disk the variant needs to download, verify and stage."""
    if not math.isfinite(staging_factor) or staging_factor < 1.0:
        raise ValueError("staging_factor must be a finite number >= 1")
    staged = math.ceil(variant.size_bytes * staging_factor)
    return max(staged, variant.min_disk_bytes or 0)


def fit_check(
    variant: Variant,
    *,
    ram_bytes: int,
    disk_free_bytes: int,
    os_reserved_bytes: int = 0,
    staging_factor: float = DEFAULT_STAGING_FACTOR,
    slots: int = 1,
) -> FitResult:
    """Decide whether ``variant`` fits before anything is downloaded.

    ``ram_bytes`` is the device's total RAM and ``disk_free_bytes`` the free
    space in the model directory, as measured. ``os_reserved_bytes`` is RAM
    the model may not use: what the firmware profile reserves for the OS,
    plus -- when the new model is loaded while the old one keeps serving --
    the old worker's resident size. ``slots`` is how many generations the
    device decodes at once (its profile's ``runtime.parallel``).
    """
    if min(ram_bytes, disk_free_bytes, os_reserved_bytes) < 0:
        raise ValueError("byte counts must not be negative")
    ram_needed = ram_needed_bytes(variant, slots)
    disk_needed = disk_needed_bytes(variant, staging_factor)
    usable_ram = ram_bytes - os_reserved_bytes
    if ram_needed > usable_ram:
        reason = "insufficient_ram"
        detail = f"needs {ram_needed} bytes of RAM, {max(usable_ram, 0)} usable"
    elif disk_needed > disk_free_bytes:
        reason = "insufficient_disk"
        detail = f"needs {disk_needed} bytes of disk, {disk_free_bytes} free"
    else:
        reason = "ok"
        detail = f"fits: {ram_needed} of {usable_ram} RAM, {disk_needed} of {disk_free_bytes} disk"
    return FitResult(
        ok=reason == "ok",
        reason=reason,
        ram_needed_bytes=ram_needed,
        disk_needed_bytes=disk_needed,
        detail=detail,
    )


@dataclass(frozen=True, slots=True)
class SetMember:
    """One model of a desired set, as the set's fit check sees it."""

    name: str
    variant: Variant
    #: generations it decodes at once on this device
    slots: int = 1
    #: its artifact is not installed yet: it needs disk to download and stage
    download: bool = True
    #: it changes version: its new worker loads beside the old one (warm swap)
    swaps: bool = True


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def set_fit_check(
    members: list[SetMember],
    *,
    ram_bytes: int,
    disk_free_bytes: int,
    os_reserved_bytes: int = 0,
    staging_factor: float = DEFAULT_STAGING_FACTOR,
    max_loaded: int | None = None,
) -> FitResult:
    """Does a whole desired set fit? Checked before any of it downloads.

    RAM: the models loaded together at most (``max_loaded`` of them, the
    largest; all of them with no cap), each with its KV cache per slot, plus
    room for one warm-swap candidate (the largest model that changes
    version), plus ``os_reserved_bytes``. Disk: every artifact still to
    download, with staging. The detail names each figure, so an operator
    sees which model tips it over.
    """
    if min(ram_bytes, disk_free_bytes, os_reserved_bytes) < 0:
        raise ValueError("byte counts must not be negative")
    if max_loaded is not None and max_loaded < 1:
        raise ValueError("max_loaded must be at least 1 (None: no cap)")
    needs = sorted(((ram_needed_bytes(m.variant, m.slots), m.name) for m in members),
                   reverse=True)
    loaded = needs if max_loaded is None else needs[:max_loaded]
    candidate = max((ram_needed_bytes(m.variant, m.slots) for m in members if m.swaps),
                    default=0)
    ram_needed = sum(need for need, _ in loaded) + candidate
    disk_needed = sum(disk_needed_bytes(m.variant, staging_factor)
                      for m in members if m.download)
    usable_ram = ram_bytes - os_reserved_bytes
    loaded_text = " + ".join(f"{name} {_mib(need)}" for need, name in loaded) or "nothing"
    ram_text = (f"{_mib(ram_needed)} of RAM ({len(loaded)} loaded together: {loaded_text}; "
                f"{_mib(candidate)} for a warm-swap candidate)")
    if ram_needed > usable_ram:
        reason = "insufficient_ram"
        detail = (f"the set of {len(members)} models needs {ram_text}, "
                  f"{_mib(max(usable_ram, 0))} usable after the OS reserve")
    elif disk_needed > disk_free_bytes:
        reason = "insufficient_disk"
        detail = (f"the set of {len(members)} models needs {_mib(disk_needed)} of disk to "
                  f"download and stage, {_mib(disk_free_bytes)} free")
    else:
        reason = "ok"
        detail = (f"the set fits: {ram_text} of {_mib(usable_ram)} usable, "
                  f"{_mib(disk_needed)} of {_mib(disk_free_bytes)} disk")
    return FitResult(ok=reason == "ok", reason=reason, ram_needed_bytes=ram_needed,
                     disk_needed_bytes=disk_needed, detail=detail)
