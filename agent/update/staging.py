"""Checks around getting a verified artifact into the model store.

Small, synchronous pieces the update pipeline runs (in a thread where they
touch big files):

- :func:`disk_fit`: the fit check before downloading, counting what the
  store could clean up and what a partial download already holds.
- :func:`installed_copy`: is this exact variant already in the store (a
  rollback to the ``previous`` version needs no download)? Its stored
  manifest must be this release's and its hash must match, or it is not
  reused.
- :func:`check_tokenizer`: the GGUF's tokenizer against the variant's
  ``tokenizer_sha256``, when the release states one.
- :func:`store_manifest`: what the store keeps next to the artifact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import (
    Capabilities,
    EventCode,
    FitResult,
    Variant,
    VerifiedEntry,
    canonical_json,
    disk_needed_bytes,
    fit_check,
)

from ..cgroup import memory_limit_bytes
from ..disk import disk_free_bytes
from ..errors import StoreError
from ..gguf import GgufError, tokenizer_sha256
from ..profiles import FirmwareProfile
from .folder import held_bytes
from .store import ModelStore, ModelVersion

MIB = 1 << 20


class StagingError(Exception):
    """The artifact or the store does not allow this update; ``reason`` is the event code."""

    def __init__(self, reason: EventCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def store_manifest(verified: VerifiedEntry) -> dict[str, Any]:
    """The manifest stored with an installed version: identity plus the signed release."""
    manifest, variant = verified.manifest, verified.variant
    release = verified.entry.release
    # A folder's file list, so the store can check the folder whole without the release.
    files = None if variant.files is None else [f.model_dump() for f in variant.files]
    return {
        "sha256": variant.sha256,
        "size": variant.size_bytes,
        "name": manifest.name,
        "version": manifest.version,
        "tier": verified.tier.value,
        "format": variant.format,
        **({} if files is None else {"files": files}),
        "release_sha256": hashlib.sha256(canonical_json(release)).hexdigest(),
        # The release envelope as signed, so the version can be re-verified offline.
        "release": release,
    }


def _is_this_variant(stored: dict[str, Any], verified: VerifiedEntry) -> bool:
    expected = store_manifest(verified)
    return all(stored.get(k) == expected[k] for k in ("sha256", "size", "name", "version", "tier"))


def installed_copy(
    store: ModelStore, key: str, verified: VerifiedEntry
) -> ModelVersion | None:
    """The intact installed copy of this exact variant under ``key``, or ``None``.

    Raises :class:`StagingError` when ``key`` is installed but is not this
    release's variant (``store_conflict``: the same name@version was signed
    twice with different artifacts) or fails its hash (``store_corrupt``):
    the store never replaces an installed version in place, so neither can
    be repaired by downloading again.
    """
    try:
        version = store.version(key)
    except StoreError as exc:
        raise StagingError(EventCode.STORE_CORRUPT, str(exc)) from exc
    if version is None:
        return None
    if not _is_this_variant(version.manifest, verified):
        raise StagingError(
            EventCode.STORE_CONFLICT,
            f"installed {key} is not this release's variant "
            f"(sha256 {version.manifest.get('sha256')}, signed {verified.variant.sha256})",
        )
    if not store.verify_hash(key):
        raise StagingError(EventCode.STORE_CORRUPT, f"installed {key} fails its sha256 check")
    return version


@dataclass(frozen=True, slots=True)
class DiskFit:
    """The fit check's result, and whether the store must be cleaned up first."""

    result: FitResult
    #: True when the download fits only after older versions are deleted
    needs_gc: bool


def reclaimable_bytes(store: ModelStore, protect: Iterable[str] = ()) -> int:
    """Bytes that deleting every version but ``active``, ``previous`` and ``protect`` frees."""
    protected = {v.key for v in (store.active(), store.previous()) if v is not None}
    protected.update(protect)
    total = 0
    for key in store.installed():
        version = store.version(key) if key not in protected else None
        if version is not None:
            total += held_bytes(version.artifact)
    return total


def disk_fit(
    store: ModelStore,
    key: str,
    variant: Variant,
    *,
    capabilities: Capabilities,
    profile: FirmwareProfile,
    installed: bool,
    memory_limit: Callable[[], int | None] = memory_limit_bytes,
) -> DiskFit:
    """Run :func:`protocol.fit_check` with this device's measured figures.

    RAM is the measured (or simulated) total less the profile's reserve, or,
    when the agent's cgroup limit (``memory_limit()``, e.g. the unit's
    ``MemoryMax=``) is tighter, that limit less what the agent itself uses.
    Disk is measured now, on the model directory's filesystem, plus what
    the store can clean up and what a partial download of ``key`` already
    holds. An ``installed`` variant needs no disk, only RAM.
    """
    free = disk_free_bytes(store.root)
    held = held_bytes(store.staging_path(key))
    if installed:
        # Nothing to download: only the RAM check can fail.
        free = max(free, disk_needed_bytes(variant))
    reclaimable = 0 if installed else reclaimable_bytes(store)
    ram, reserved = ram_budget(capabilities, profile, memory_limit)
    result = fit_check(
        variant,
        ram_bytes=ram,
        disk_free_bytes=free + held + reclaimable,
        os_reserved_bytes=reserved,
        slots=slots_for(variant, profile),
    )
    needs_gc = result.ok and free + held < result.disk_needed_bytes
    return DiskFit(result, needs_gc)


def ram_budget(
    capabilities: Capabilities, profile: FirmwareProfile,
    memory_limit: Callable[[], int | None] = memory_limit_bytes,
) -> tuple[int, int]:
    """``(ram, reserved)`` for a fit check: RAM the models may use is ``ram - reserved``.

    The measured (or simulated) total less the profile's OS reserve, or,
    when the agent's cgroup limit (``memory_limit()``, e.g. the unit's
    ``MemoryMax=``) is tighter, that limit less what the agent itself uses.
    """
    ram, reserved = capabilities.ram_bytes, profile.runtime.os_reserved_mb * MIB
    limit = memory_limit()
    if limit is not None:
        # The OS lives outside the cgroup; the agent's own memory counts inside it.
        own = _own_rss_bytes()
        if limit - own < ram - reserved:
            ram, reserved = limit, own
    return ram, reserved


def slots_for(variant: Variant, profile: FirmwareProfile) -> int:
    """Generations ``variant`` decodes at once on this device, each with its own KV cache."""
    # ONNX and embedding models serve one caller at a time.
    if variant.format == "onnx" or variant.runtime_defaults.embeddings:
        return 1
    return profile.runtime.parallel


def _own_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def check_tokenizer(path: Path, variant: Variant) -> None:
    """Compare the GGUF's tokenizer with the variant's ``tokenizer_sha256``, if it states one.

    For GGUF the artifact sha256 already covers the embedded tokenizer (see
    :mod:`agent.gguf`); this catches a release whose stated tokenizer came
    from another release. Raises :class:`StagingError` (``tokenizer_mismatch``).
    """
    if variant.tokenizer_sha256 is None or variant.format != "gguf":
        # ONNX keeps its tokenizer outside the model graph; nothing to compare here yet.
        return
    try:
        actual = tokenizer_sha256(path)
    except (OSError, GgufError) as exc:
        raise StagingError(
            EventCode.TOKENIZER_MISMATCH, f"cannot read the GGUF tokenizer: {exc}"
        ) from exc
    if actual != variant.tokenizer_sha256:
        raise StagingError(
            EventCode.TOKENIZER_MISMATCH,
            f"GGUF tokenizer sha256 {actual}, release says {variant.tokenizer_sha256}",
        )
