"""The release spec: a small YAML file from which ``slmfleet models publish`` builds a manifest.

Example (``examples/smollm2.release.yaml`` has a complete one)::

    name: smollm2
    version: 1.0.0
    description: SmolLM2-135M-Instruct, Q4_1
    variants:
      micro:
        file: ~/.cache/slmfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf
        format: gguf
        quantization: Q4_1
        parameters: 135000000
        context_length: 8192
        runtime_defaults: {context: 2048}
        health_check:
          max_ttft_ms: 2000
          min_tokens_per_s: 5
          golden_prompts:
            - {prompt: "What is the capital of Germany?", expected: [Berlin]}

An adapter release (a LoRA fine-tune of another release, see docs/adapters.md)
has ``format: gguf-lora`` variants and says which base it applies to::

    adapter_of:
      name: smollm2
      versions: ">=1.0.0,<2.0.0"
      sha256: {micro: <sha256 of the base's micro artifact>}
      scale: 1.0

``file`` is relative to the spec's directory (``~`` and ``$VARS`` expand).
It may name a folder (an onnxruntime-genai model: ``model.onnx``,
``model.onnx.data``, ``genai_config.json``, tokenizer files): the variant is
then a folder variant, every file in it hashed and listed in ``files``
(symlinks, hidden names and anything else :mod:`controlplane.spec_folders`
refuses are errors), its ``sha256`` the digest of that list.
``artifact``, the path in the store, defaults to
``<name>/<version>/<tier>/<file or folder name>``. Everything else is a
:class:`protocol.Variant` field with the same name and rules; hashes and
sizes are measured from the files, never written by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol import (
    RELEASE_NAME_PATTERN,
    SEMVER_PATTERN,
    AdapterBase,
    HealthCheck,
    ReleaseManifest,
    RuntimeDefaults,
    Tier,
    Variant,
    VariantFile,
    files_digest,
    parse_yaml_mapping,
    validation_problems,
)

#: a spec is a few KiB; anything far bigger is the wrong file
MAX_SPEC_BYTES = 256 * 1024


class SpecError(ValueError):
    """The spec file is missing, not YAML, or does not describe a valid release."""


class VariantSpec(BaseModel):
    """One tier's build: the artifact file and the manifest fields that describe it."""

    model_config = ConfigDict(extra="forbid")

    file: Path
    format: Literal["gguf", "onnx", "gguf-lora"]
    artifact: str | None = None
    quantization: str | None = None
    parameters: int
    context_length: int
    min_ram_bytes: int | None = None
    min_disk_bytes: int | None = None
    tokenizer_sha256: str | None = None
    runtime_defaults: RuntimeDefaults = Field(default_factory=RuntimeDefaults)
    health_check: HealthCheck


class ReleaseSpec(BaseModel):
    """A release to publish, before its files are hashed and it is signed."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(pattern=RELEASE_NAME_PATTERN)]
    version: Annotated[str, StringConstraints(max_length=64, pattern=SEMVER_PATTERN)]
    description: str = ""
    variants: Annotated[dict[Tier, VariantSpec], Field(min_length=1)]
    #: an adapter release: the base it applies to
    adapter_of: AdapterBase | None = None


def load_spec(path: Path) -> ReleaseSpec:
    """Read a spec; file paths come back absolute, resolved against the spec's directory."""
    source = f"release spec {path}"
    try:
        doc = parse_yaml_mapping(path.read_bytes(), source, max_bytes=MAX_SPEC_BYTES)
        spec = ReleaseSpec.model_validate(doc)
    except FileNotFoundError:
        raise SpecError(f"release spec {path} does not exist") from None
    except ValidationError as exc:
        raise SpecError(f"{source}: {validation_problems(exc, root='(root)')}") from exc
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    base = path.resolve().parent
    for variant in spec.variants.values():
        expanded = Path(os.path.expandvars(os.path.expanduser(str(variant.file))))
        variant.file = expanded if expanded.is_absolute() else base / expanded
    return spec


def artifact_path(spec: ReleaseSpec, tier: Tier) -> str:
    """Where the tier's file (or a folder variant's folder) goes in the artifact store."""
    variant = spec.variants[tier]
    return variant.artifact or f"{spec.name}/{spec.version}/{tier.value}/{variant.file.name}"


#: what was measured of one tier: (sha256, size) of its file, or a folder's file list
Measured = tuple[str, int] | list[VariantFile]


def build_manifest(
    spec: ReleaseSpec, measured: dict[Tier, Measured], *, released_at: float
) -> ReleaseManifest:
    """The release manifest for ``spec``, given each tier's measured (sha256, size),
    or for a folder variant its files."""
    variants = {}
    for tier, v in spec.variants.items():
        found = measured[tier]
        fields = v.model_dump(exclude={"file", "artifact"}, exclude_none=True)
        if isinstance(found, list):
            fields.update(files=found, sha256=files_digest(found),
                          size_bytes=sum(f.size_bytes for f in found))
        else:
            fields.update(sha256=found[0], size_bytes=found[1])
        fields.update(
            artifact=artifact_path(spec, tier),
            runtime_defaults=v.runtime_defaults,
            health_check=v.health_check,
        )
        try:
            variants[tier] = Variant(**fields)
        except ValidationError as exc:
            hint = ""
            if any(err["loc"] == ("artifact",) for err in exc.errors()):
                hint = " (set `artifact:` to a path of [A-Za-z0-9._-] segments)"
            problems = validation_problems(exc, root="(root)")
            raise SpecError(f"variants.{tier.value}: {problems}{hint}") from exc
    try:
        return ReleaseManifest(
            name=spec.name,
            version=spec.version,
            released_at=released_at,
            description=spec.description,
            variants=variants,
            adapter_of=spec.adapter_of,
        )
    except ValidationError as exc:
        raise SpecError(validation_problems(exc, root="(root)")) from exc
