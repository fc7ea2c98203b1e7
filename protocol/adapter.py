"""Adapter releases: a fine-tune of a few megabytes bound to the base model it was trained on.

A LoRA adapter is a release of its own (:class:`protocol.ReleaseManifest`,
signed by the release keys like any other), whose variants have format
``gguf-lora`` (llama.cpp's GGUF adapter file: hash, size and path as any
artifact) and whose ``adapter_of`` names the base it applies to
(:class:`AdapterBase`): the base release's name, a range of its versions,
the sha256 of the base's variant **per tier** (an adapter trained on one
quantization of the base is not another's), and the scale it is applied
with. A device never downloads the base again for it.

The device's checks (:func:`check_base`), before anything is downloaded,
continuing the table of :mod:`.assignment` (A1-A11) for an adapter entry:

====  ======================================================  ===============
B1    the release is an adapter (``adapter_of`` present)      (not an adapter)
B2    the base's name is active on this device                ``base_mismatch``
B3    the active base's version is in the adapter's range     ``base_mismatch``
B4    the adapter names a base sha256 for the entry's tier    ``base_mismatch``
      and it is the active base's artifact sha256 (names
      matching is not enough: a different build of the same
      version is another model)
====  ======================================================  ===============

Pure: values in, a :class:`BaseMismatch` out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, StringConstraints, field_validator

from .errors import ProtocolError
from .messages import Tier, Wire

if TYPE_CHECKING:
    from .manifest import ReleaseManifest

#: the variant format of a LoRA adapter in llama.cpp's GGUF adapter layout
ADAPTER_FORMAT = "gguf-lora"
#: separates a base model's name from an adapter's in a request's ``model``
ADAPTER_SEPARATOR = "+"

# The same shapes as the release manifest's own (protocol/manifest.py imports
# this module, so it cannot be imported from here).
_BASE_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"
_COMPARATOR_RE = re.compile(r"^(>=|<=|>|<|==)(\S+)$")
#: comparators in a version range at most (a lower and an upper bound, and room)
MAX_COMPARATORS = 4


class BaseMismatch(ProtocolError):
    """The adapter does not apply to the base this device has active (rules B2-B4)."""

    reason = "base_mismatch"


def parse_range(text: str) -> list[tuple[str, str]]:
    """``">=1.1.0,<2.0.0"`` as ``[(">=", "1.1.0"), ("<", "2.0.0")]``; ``ValueError`` if bad.

    Comparators are ``>=``, ``>``, ``<=``, ``<`` and ``==``, each before a
    semantic version, joined by commas; all of them must hold.
    """
    from .manifest import semver_key

    parts = [part.strip() for part in text.split(",")]
    if not 1 <= len(parts) <= MAX_COMPARATORS:
        raise ValueError(f"a version range has 1 to {MAX_COMPARATORS} comparators")
    out = []
    for part in parts:
        match = _COMPARATOR_RE.fullmatch(part)
        if match is None:
            raise ValueError(f"{part!r} is not a comparator (>=, >, <=, <, == and a version)")
        semver_key(match.group(2))  # raises ValueError if not semver
        out.append((match.group(1), match.group(2)))
    return out


def in_range(version: str, text: str) -> bool:
    """Does semver ``version`` satisfy every comparator of the range ``text``?"""
    from .manifest import semver_key

    key = semver_key(version)
    checks = {
        ">=": lambda bound: key >= bound, ">": lambda bound: key > bound,
        "<=": lambda bound: key <= bound, "<": lambda bound: key < bound,
        "==": lambda bound: key == bound,
    }
    return all(checks[op](semver_key(bound)) for op, bound in parse_range(text))


class AdapterBase(Wire):
    """The base model an adapter release applies to."""

    #: the base's release name (its model name on the device)
    name: Annotated[str, StringConstraints(pattern=_BASE_NAME)]
    #: base versions it applies to, e.g. ``">=1.1.0,<1.2.0"``
    versions: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    #: the base variant's artifact sha256, per tier the adapter has a variant for
    sha256: Annotated[
        dict[Tier, Annotated[str, StringConstraints(pattern=_SHA256)]],
        Field(min_length=1),
    ]
    #: how strongly it is applied (llama.cpp's adapter scale; alpha/rank is in the file)
    scale: Annotated[float, Field(strict=True, gt=0, le=8)] = 1.0

    @field_validator("versions")
    @classmethod
    def _range(cls, value: str) -> str:
        parse_range(value)
        return value


def check_adapter_release(manifest: ReleaseManifest) -> None:
    """Raise ``ValueError`` unless adapter fields and variant formats agree.

    An adapter release has only ``gguf-lora`` variants, each for a tier its
    base names a sha256 for; any other release has none.
    """
    lora = {tier for tier, v in manifest.variants.items() if v.format == ADAPTER_FORMAT}
    base = manifest.adapter_of
    if base is None:
        if lora:
            raise ValueError(f"a {ADAPTER_FORMAT} variant needs adapter_of (its base)")
        return
    if lora != set(manifest.variants):
        raise ValueError(f"an adapter release has only {ADAPTER_FORMAT} variants")
    if base.name == manifest.name:
        raise ValueError("an adapter cannot be its own base")
    missing = sorted(t.value for t in manifest.variants if t not in base.sha256)
    if missing:
        raise ValueError(f"adapter_of.sha256 names no base for tier(s) {', '.join(missing)}")


@dataclass(frozen=True, slots=True)
class ActiveBase:
    """What a device has active under one model name (for :func:`check_base`)."""

    name: str
    version: str
    sha256: str


def check_base(manifest: ReleaseManifest, tier: Tier,
               active: Mapping[str, ActiveBase]) -> AdapterBase | None:
    """Rules B1-B4: the adapter's base binding if it applies here; raise :class:`BaseMismatch`.

    ``active`` maps model names to what the device has active under them.
    Returns None for a release that is not an adapter (B1).
    """
    base = manifest.adapter_of
    if base is None:
        return None  # B1
    current = active.get(base.name)
    if current is None:  # B2
        raise BaseMismatch(f"{manifest.ref} applies to {base.name}, which is not active here")
    if not in_range(current.version, base.versions):  # B3
        raise BaseMismatch(f"{manifest.ref} applies to {base.name} {base.versions}, "
                           f"active is {current.version}")
    wanted = base.sha256.get(tier)
    if wanted != current.sha256:  # B4
        raise BaseMismatch(
            f"{manifest.ref} applies to {base.name} with sha256 {str(wanted)[:12]}... on "
            f"{tier.value}, active {current.name}@{current.version} is {current.sha256[:12]}..."
        )
    return base


def split_model(requested: str) -> tuple[str, str | None]:
    """``"smollm2+support-formal"`` as ``("smollm2", "support-formal")``; no ``+``: no adapter."""
    base, sep, adapter = requested.partition(ADAPTER_SEPARATOR)
    return (base, adapter or None) if sep else (requested, None)
