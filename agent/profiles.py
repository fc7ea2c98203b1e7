"""Firmware profiles: recognise a hardware class, set its tier and runtime settings.

A profile is one YAML file in ``firmware-profiles/`` (see DESIGN.md "Tiers and
firmware profiles")::

    id: raspberry-pi-4-4gb          # must equal the file name without .yaml
    description: Raspberry Pi 4 Model B, 4 GB
    tier: micro
    priority: 100                   # the most specific match wins
    match:                          # every rule given must hold; all optional
      arch: [aarch64]
      board_model: '^Raspberry Pi 4'      # regex, case-insensitive, re.search
      cpu_model: 'Cortex-A72'             # regex, case-insensitive, re.search
      ram_gib: {min: 3, max: 4.5}         # measured GiB, inclusive
      accelerator: {kind: gpu, vendor: NVIDIA, name: 'RTX', min_memory_gib: 15.5}
    runtime:
      threads: 4                    # null: all cores
      gpu_layers: 0
      onnx_providers: [CPUExecutionProvider]
      os_reserved_mb: 512
      context_cap: 2048
      batch: 256
      mmap: true

Rule values are compared with what the probe *measures*, so write them that
way: a "16 GB" GPU reports 16376 MiB (15.99 GiB), a "4 GB" Pi about 3.7 GiB.
An ``accelerator`` rule holds when one accelerator satisfies all its fields.

The fallback when nothing matches is built in code, not shipped as YAML:
:func:`generic_profile` (id ``generic``) with conservative CPU-only runtime
settings and a tier computed from measured capabilities by
:func:`compute_tier`. Keeping it in code means an operator who empties or
replaces the profile directory still gets a working device, and no YAML file
needs a "tier: computed" special case.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol import Capabilities, Tier, parse_yaml_mapping, validation_problems

log = logging.getLogger(__name__)

GIB = 1024**3
GENERIC_PROFILE_ID = "generic"
#: Profiles are small hand-written files; anything larger is a mistake.
MAX_PROFILE_BYTES = 64 * 1024
#: Measured total RAM (and GPU memory) is a bit under the nominal size: the
#: kernel, firmware and GPU carve-outs take their share ("8 GB" Pi 5 reports
#: ~7.9 GiB, Jetson Orin Nano 8 GB ~7.4 GiB, a 16 GB GPU 15.99 GiB).
NOMINAL_SLACK = 0.9

ProfileId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _search(pattern: str | None, text: str) -> bool:
    """True when no pattern is given or it is found in ``text``."""
    return pattern is None or _regex(pattern).search(text) is not None


class RamRange(_Strict):
    """Measured total RAM in GiB, bounds inclusive; either may be left out."""

    min: Annotated[float, Field(ge=0)] | None = None
    max: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RamRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def holds(self, ram_bytes: int) -> bool:
        gib = ram_bytes / GIB
        return (self.min is None or gib >= self.min) and (self.max is None or gib <= self.max)


class AcceleratorRule(_Strict):
    """Holds when one of the device's accelerators satisfies every given field."""

    kind: Literal["gpu", "npu"] | None = None
    vendor: str | None = None
    name: str | None = None
    #: dedicated memory; a shared-memory GPU (Jetson) reports 0
    min_memory_gib: Annotated[float, Field(ge=0)] | None = None

    @field_validator("vendor", "name")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return _check_regex(value)

    def holds(self, caps: Capabilities) -> bool:
        return any(
            (self.kind is None or acc.kind == self.kind)
            and _search(self.vendor, acc.vendor)
            and _search(self.name, acc.name)
            and (self.min_memory_gib is None or acc.memory_bytes / GIB >= self.min_memory_gib)
            for acc in caps.accelerators
        )


class MatchRules(_Strict):
    """How to recognise a device; every rule given must hold, none given matches all."""

    arch: list[str] | None = None
    board_model: str | None = None
    cpu_model: str | None = None
    ram_gib: RamRange | None = None
    accelerator: AcceleratorRule | None = None

    @field_validator("board_model", "cpu_model")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return _check_regex(value)

    def holds(self, caps: Capabilities) -> bool:
        return (
            (self.arch is None or caps.cpu.arch in self.arch)
            and _search(self.board_model, caps.board_model)
            and _search(self.cpu_model, caps.cpu.model)
            and (self.ram_gib is None or self.ram_gib.holds(caps.ram_bytes))
            and (self.accelerator is None or self.accelerator.holds(caps))
        )


#: most parallel generations a profile or the agent config may ask for
MAX_PARALLEL = 64


class RuntimeSettings(_Strict):
    """How the inference worker runs models on this hardware class."""

    #: inference threads; None means all physical cores
    threads: Annotated[int, Field(ge=1, le=4096)] | None = None
    #: llama.cpp layers offloaded to the GPU (99 or -1: all of them)
    gpu_layers: Annotated[int, Field(ge=-1)] = 0
    #: onnxruntime execution providers in preference order; empty: onnxruntime's default
    onnx_providers: list[str] = ["CPUExecutionProvider"]
    #: RAM kept free for the OS and the agent when fitting a model
    os_reserved_mb: Annotated[int, Field(ge=0)] = 1024
    #: upper bound on a variant's context length (KV cache RAM); None: the variant's
    context_cap: Annotated[int, Field(ge=1)] | None = None
    #: prompt-processing batch size; None: the runtime's default
    batch: Annotated[int, Field(ge=1)] | None = None
    #: map model files instead of reading them into RAM
    mmap: bool = True
    #: generations a llama.cpp model decodes at once (each holds its own KV cache)
    parallel: Annotated[int, Field(ge=1, le=MAX_PARALLEL)] = 1


class FirmwareProfile(_Strict):
    """One hardware class: how to recognise it, its tier, its runtime settings."""

    id: ProfileId
    description: Annotated[str, Field(min_length=1, max_length=512)]
    tier: Tier
    #: higher wins when several profiles match; ties go to the smaller id
    priority: int = 0
    match: MatchRules = MatchRules()
    runtime: RuntimeSettings = RuntimeSettings()

    def matches(self, caps: Capabilities) -> bool:
        """True when every match rule holds for ``caps``."""
        return self.match.holds(caps)


# -- loading -------------------------------------------------------------------


def load_profile(path: Path) -> FirmwareProfile:
    """Read and validate one profile; errors are ``ValueError`` naming file and field."""
    source = f"firmware profile {path}"
    data = parse_yaml_mapping(
        path.read_bytes(), source, max_bytes=MAX_PROFILE_BYTES, expected="a mapping of fields"
    )
    try:
        profile = FirmwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{source}: {validation_problems(exc)}") from exc
    # id == file name keeps ids unique and lets an operator find the file
    # behind the profile a device reports.
    if profile.id != path.stem:
        raise ValueError(f"firmware profile {path}: id: {profile.id!r} must equal {path.stem!r}")
    if profile.id == GENERIC_PROFILE_ID:
        raise ValueError(f"firmware profile {path}: id: {GENERIC_PROFILE_ID!r} is reserved")
    return profile


def load_profiles(directory: Path) -> list[FirmwareProfile]:
    """Every ``*.yaml`` profile in ``directory``, sorted by file name.

    Raises ``ValueError`` for a missing directory or any malformed profile:
    a device must not silently fall back to the generic tier because one
    file has a typo.
    """
    if not directory.is_dir():
        raise ValueError(f"firmware profile directory {directory} does not exist")
    return [load_profile(path) for path in sorted(directory.glob("*.yaml"))]


def default_profiles_dir() -> Path:
    """Where profiles live: the first existing of, in order,

    ``$SLMFLEET_PROFILES_DIR``, ``/etc/slmfleet/firmware-profiles``, the
    repository's ``firmware-profiles/`` (source checkout, editable install),
    and ``agent/firmware_profiles_data`` (wheels force-include the directory
    there). Returns the last candidate when none exists, so the error from
    :func:`load_profiles` names a path.
    """
    here = Path(__file__).resolve()
    candidates = [
        Path("/etc/slmfleet/firmware-profiles"),
        here.parents[1] / "firmware-profiles",
        here.parent / "firmware_profiles_data",
    ]
    if env := os.environ.get("SLMFLEET_PROFILES_DIR"):
        candidates.insert(0, Path(env))
        if not Path(env).is_dir():
            log.warning("SLMFLEET_PROFILES_DIR=%s is not a directory; ignoring it", env)
    return next((path for path in candidates if path.is_dir()), candidates[-1])


# -- matching ------------------------------------------------------------------


def compute_tier(caps: Capabilities) -> Tier:
    """The tier measured capabilities support, after DESIGN.md's size classes.

    medium: RAM >= 32 GB or a GPU with >= 16 GB of its own memory;
    small: RAM >= 8 GB or an NPU; micro otherwise. Nominal sizes get
    :data:`NOMINAL_SLACK` because measured totals fall a little short.
    """
    ram = caps.ram_bytes / GIB
    gpu_memory = max(
        (a.memory_bytes / GIB for a in caps.accelerators if a.kind == "gpu"), default=0.0
    )
    if ram >= 32 * NOMINAL_SLACK or gpu_memory >= 16 * NOMINAL_SLACK:
        return Tier.MEDIUM
    if ram >= 8 * NOMINAL_SLACK or any(a.kind == "npu" for a in caps.accelerators):
        return Tier.SMALL
    return Tier.MICRO


def generic_profile(caps: Capabilities) -> FirmwareProfile:
    """The fallback for a device no profile matches: computed tier, CPU-only settings.

    CPU-only because an unknown board's GPU or NPU may lack the driver or
    runtime build to use it; a profile is how an operator turns one on.
    """
    return FirmwareProfile(
        id=GENERIC_PROFILE_ID,
        description="No firmware profile matched; tier computed from measured capabilities.",
        tier=compute_tier(caps),
        priority=-(2**31),
    )


def match_profile(caps: Capabilities, profiles: list[FirmwareProfile]) -> FirmwareProfile:
    """The most specific profile matching ``caps``, else :func:`generic_profile`.

    Most specific means highest ``priority``; equal priorities go to the
    smaller id, so the choice never depends on file order.
    """
    matching = [p for p in profiles if p.matches(caps)]
    if not matching:
        return generic_profile(caps)
    return min(matching, key=lambda p: (-p.priority, p.id))


def with_overrides(profile: FirmwareProfile, *, parallel: int | None) -> FirmwareProfile:
    """``profile`` with what this device's agent config states over it (None: the profile's)."""
    if parallel is None:
        return profile
    runtime = profile.runtime.model_copy(update={"parallel": parallel})
    return profile.model_copy(update={"runtime": runtime})
