"""What a worker loads: one installed model version and its runtime settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..profiles import RuntimeSettings
from ..runtime_settings import EffectiveRuntime, runtime_from_defaults
from ..update.store import ModelVersion

#: context for a model stored without its release (nothing says better)
FALLBACK_CONTEXT = 2048


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model version as a worker runs it."""

    key: str
    name: str
    version: str
    format: str
    path: Path
    runtime: EffectiveRuntime
    sha256: str = ""
    #: RAM its worker needs (weights, KV cache per slot); 0: estimate from the file.
    #: An estimate, not part of what the spec is: the health check's spec (built
    #: from the staged request) must equal the activated one (built from the
    #: store) for the warm candidate to take the traffic
    ram_bytes: int = field(default=0, compare=False)

    @property
    def ref(self) -> str:
        """``name@version``: what responses and metrics call it."""
        return f"{self.name}@{self.version}"

    def load_frame(self) -> dict[str, Any]:
        """The worker's ``load`` request."""
        return {"op": "load", "model": str(self.path), "format": self.format,
                "runtime": self.runtime.as_dict()}


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One installed LoRA adapter version and the base build it applies to."""

    name: str
    version: str
    #: the base model's name, and the artifact sha256 of the build it was made for
    base: str
    base_sha256: str
    path: Path
    scale: float = 1.0
    sha256: str = ""

    @property
    def ref(self) -> str:
        """``name@version``: the key the worker knows it by."""
        return f"{self.name}@{self.version}"

    def load_payload(self) -> dict[str, Any]:
        """The worker's ``adapter_load`` fields."""
        return {"name": self.ref, "path": str(self.path), "scale": self.scale}


def adapter_spec_for_version(version: ModelVersion) -> AdapterSpec | None:
    """The adapter an installed version is, or None when it is a model.

    Read from the stored release (verified when it was installed).
    """
    from protocol import ADAPTER_FORMAT, AdapterBase, Tier

    manifest = version.manifest
    if manifest.get("format") != ADAPTER_FORMAT:
        return None
    try:
        binding = AdapterBase.model_validate(manifest["release"]["signed"]["adapter_of"])
        base_sha = binding.sha256[Tier(manifest.get("tier", "micro"))]
    except (KeyError, TypeError, ValueError):
        return None
    return AdapterSpec(name=manifest["name"], version=manifest["version"], base=binding.name,
                       base_sha256=base_sha, path=version.artifact, scale=binding.scale,
                       sha256=manifest.get("sha256", ""))


def spec_for_version(version: ModelVersion, profile: RuntimeSettings) -> ModelSpec:
    """The spec of an installed version, its runtime settings from the stored release.

    The release was verified when the version was installed; the store is
    the agent's own trusted state, so its runtime defaults are read as they are.
    """
    from protocol import RuntimeDefaults, Variant
    from protocol.fit import ram_needed_bytes

    manifest = version.manifest
    tier = manifest.get("tier", "micro")
    fmt = manifest.get("format", "gguf")
    try:
        variant = Variant.model_validate(manifest["release"]["signed"]["variants"][tier])
        defaults, context = variant.runtime_defaults, variant.runtime_context
    except (KeyError, TypeError, ValueError):
        variant, defaults, context = None, RuntimeDefaults(), FALLBACK_CONTEXT
    runtime = runtime_from_defaults(profile, defaults, context, onnx=fmt == "onnx")
    ram = 0
    if variant is not None:
        # The fit check's figure for the slots this device runs the model with.
        parallel = runtime.parallel if fmt == "gguf" and not runtime.embeddings else 1
        ram = ram_needed_bytes(variant, max(parallel, 1))
    return ModelSpec(
        key=version.key,
        name=manifest["name"],
        version=manifest["version"],
        format=fmt,
        path=version.artifact,
        runtime=runtime,
        sha256=manifest.get("sha256", ""),
        ram_bytes=ram,
    )
