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

from collections.abc import Iterable, Mapping

from protocol import ActiveBase, VerifiedEntry

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


def incoming_bases(entries: Mapping[str, VerifiedEntry]) -> dict[tuple[str, str], ActiveBase]:
    """What each unit of a document brings, by (unit, model name): the build it will run."""
    return {(e.entry.unit, e.manifest.name): ActiveBase(e.manifest.name, e.manifest.version,
                                                        e.variant.sha256)
            for e in entries.values() if e.entry.unit is not None and e.manifest.adapter_of is None}


def bases_for(entry: VerifiedEntry, active: Mapping[str, ActiveBase],
              incoming: Mapping[tuple[str, str], ActiveBase]) -> Mapping[str, ActiveBase]:
    """What an adapter entry's base is checked against: the active bases, except the
    one its own unit brings (they are installed and activated together)."""
    binding, unit = entry.manifest.adapter_of, entry.entry.unit
    if binding is None or unit is None or (unit, binding.name) not in incoming:
        return active
    return {**active, binding.name: incoming[(unit, binding.name)]}
