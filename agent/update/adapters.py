"""Adapter entries in the update pipeline: what ties a verified adapter to its base.

An adapter release goes through the same steps as a model (download,
verify, install into its own name's store, health check, activate, roll
back); the differences are small and gathered here: its base is checked
before download (:mod:`agent.update.intake`, rule E2a), its health check
runs on the base's serving worker with the adapter applied, and when a
base's version changes, the adapters made for another build of it stop
being served and say so (:func:`inactive_adapters`).
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol import VerifiedEntry

from ..inference.spec import AdapterSpec


def adapter_base(entry: VerifiedEntry) -> tuple[str, str, float] | None:
    """(base name, base build's sha256 on the entry's tier, scale) of an adapter entry."""
    binding = entry.manifest.adapter_of
    if binding is None:
        return None
    return binding.name, binding.sha256[entry.tier], binding.scale


def inactive_adapters(base: str, base_sha256: str,
                      adapters: Iterable[AdapterSpec]) -> list[AdapterSpec]:
    """The active ``adapters`` of ``base`` that were made for another build than ``base_sha256``."""
    return [a for a in adapters if a.base == base and a.base_sha256 != base_sha256]
