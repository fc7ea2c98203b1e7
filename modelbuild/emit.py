"""The release spec a build emits, ready for ``slmfleet models publish``.

The format of ``examples/smollm2.release.yaml`` (:mod:`controlplane.release_spec`):
one variant per tier, its ``file`` the chosen candidate's file in the build
directory, ``min_ram_bytes`` the RAM measured at the tier's context
(so a device's fit check uses the measured figure, not an estimate), and
``runtime_defaults.context`` that context. The evaluation set the variants
were judged on is pinned too (``eval_set.path``), so the devices score the
release on the same items and a rollout's quality gate compares like with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from protocol import Tier, Variant

from .measure import Measurement
from .spec import BuildSpec, Candidate


def variant_fields(spec: BuildSpec, tier: Tier, candidate: Candidate,
                   measured: Measurement) -> dict[str, Any]:
    """The manifest fields of ``candidate`` serving ``tier`` (all but file, hash and artifact)."""
    budget = spec.tiers[tier]
    defaults = spec.release.runtime_defaults.model_dump(exclude_none=True)
    defaults["context"] = budget.context
    if candidate.format == "onnx":
        # onnxruntime-genai reads its folder whole: there is no mapping to choose
        defaults.pop("mmap", None)
    return {
        "format": candidate.format,
        "quantization": candidate.quantization,
        "parameters": spec.source.parameters,
        "context_length": spec.source.context_length,
        "min_ram_bytes": measured.ram_at(budget.context),
        "runtime_defaults": defaults,
        "health_check": spec.release.health_check.model_dump(exclude_none=True),
    }


def as_variant(spec: BuildSpec, tier: Tier, candidate: Candidate, measured: Measurement,
               sha256: str) -> Variant:
    """The :class:`protocol.Variant` the candidate would publish as (for the fit check)."""
    name = candidate.name if candidate.format == "onnx" else f"{candidate.name}.gguf"
    return Variant(sha256=sha256, size_bytes=measured.size_bytes,
                   artifact=f"{spec.name}/{spec.version}/{tier.value}/{name}",
                   **variant_fields(spec, tier, candidate, measured))


def release_spec(spec: BuildSpec, chosen: dict[Tier, Candidate], files: dict[str, Path],
                 measured: dict[str, Measurement]) -> dict[str, Any]:
    """The release spec document for the chosen candidates (``files``: name -> GGUF)."""
    variants = {}
    for tier in sorted(chosen, key=lambda t: t.rank):
        candidate = chosen[tier]
        variants[tier.value] = {"file": str(files[candidate.name]),
                                **variant_fields(spec, tier, candidate, measured[candidate.name])}
    return {"name": spec.name, "version": spec.version,
            "description": spec.release.description, "variants": variants,
            "eval_set": {"path": str(spec.eval_set)}}


def write_release_spec(path: Path, document: dict[str, Any], spec_path: Path) -> None:
    """Write ``document`` as YAML with a header saying where it came from."""
    header = (f"# Release spec built by `slmfleet models build {spec_path}`.\n"
              "# Publish with: slmfleet models publish --spec <this file> --key <key> "
              "--server <url>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(document, sort_keys=False))
    tmp.replace(path)
