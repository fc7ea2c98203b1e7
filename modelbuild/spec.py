"""The build spec: a YAML file that says what ``slmfleet models build`` makes and how it judges.

Example (``examples/smollm2.build.yaml`` has a complete one, docs/build.md
explains every field)::

    name: smollm2
    version: 1.1.0
    source: {file: ~/.cache/slmfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf,
             parameters: 135000000, context_length: 8192}
    held_out: {text: smollm2.heldout.txt, context: 128}
    eval_set: smollm2.evalset.json
    floors: {max_perplexity_increase: 0.10, min_eval_ratio: 0.95}
    candidates:
      - {name: q8_0, type: Q8_0}
      - {name: q4_0-ffn-q2_0, type: Q4_0, overrides: {"ffn_(up|gate)": Q2_0}}
    tiers:
      micro: {ram_bytes: 536870912, os_reserved_bytes: 268435456, context: 2048}
    release:
      health_check: {max_ttft_ms: 2000, golden_prompts: [...]}

Paths are relative to the spec's directory (``~`` and ``$VARS`` expand).
Types are checked against the llama.cpp the build runs
(:mod:`modelbuild.quant_types`), so a misspelt type fails here, before any
quantization.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from protocol import (
    RELEASE_NAME_PATTERN,
    SEMVER_PATTERN,
    HealthCheck,
    RuntimeDefaults,
    Tier,
    parse_yaml_mapping,
    validation_problems,
)

from .quant_types import file_type, tensor_type

MAX_SPEC_BYTES = 256 * 1024
#: a candidate's name becomes part of a file name and the manifest's ``quantization``
_CANDIDATE_NAME = r"^[a-z0-9][a-z0-9._-]{0,31}$"


class BuildSpecError(ValueError):
    """The build spec is missing, not YAML, or does not describe a valid build."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """The model every candidate is quantized from, and what the release says of it."""

    file: Path
    parameters: Annotated[int, Field(ge=1)]
    context_length: Annotated[int, Field(ge=1)]


class HeldOut(_Strict):
    """The text perplexity is measured on, as llama.cpp's perplexity tool does."""

    text: Path
    #: tokens per chunk (llama-perplexity's ``-c``); the text needs at least two chunks
    context: Annotated[int, Field(ge=16, le=8192)] = 128
    #: stop after this many chunks (llama-perplexity's ``--chunks``); None: the whole text
    chunks: Annotated[int, Field(ge=1)] | None = None


class Floors(_Strict):
    """How much worse than the source a candidate may measure and still be chosen."""

    #: relative perplexity increase allowed (0.10: at most 10 % above the source's)
    max_perplexity_increase: Annotated[float, Field(ge=0)] = 0.10
    #: the candidate's eval score over the source's, at least
    min_eval_ratio: Annotated[float, Field(ge=0, le=1)] = 0.95


#: the model formats a candidate can be and a tier's devices can run
Format = Literal["gguf", "onnx"]


class Candidate(_Strict):
    """One variant to judge: a quantization to make (a llama.cpp file type, with
    per-tensor overrides), or an ONNX build that exists already (``folder``)."""

    name: Annotated[str, StringConstraints(pattern=_CANDIDATE_NAME)]
    #: ``gguf``: quantized from the source by llama.cpp; ``onnx``: an onnxruntime-genai folder
    format: Format = "gguf"
    #: llama.cpp file type (``Q8_0``, ``Q5_1``, ``Q4_0``, ``IQ4_NL``, ``Q2_0``, ...); for an
    #: ONNX candidate, the manifest's ``quantization`` label (``int4``)
    type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,32}$")]
    #: an ONNX candidate's folder (``model.onnx``, ``genai_config.json``, tokenizer files)
    folder: Path | None = None
    #: tensor-name regex -> tensor type, first match wins (llama-quantize's --tensor-type)
    overrides: dict[str, str] = Field(default_factory=dict)
    #: a GGUF importance matrix (llama-imatrix's output) to weigh the rounding with
    imatrix: Path | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("format") == "onnx":
            return value
        file_type(value)
        return value.upper()

    @model_validator(mode="after")
    def _onnx_is_a_folder(self) -> Candidate:
        if self.format == "onnx":
            if self.folder is None:
                raise ValueError(f"candidate {self.name}: an onnx candidate names its folder")
            if self.overrides or self.imatrix:
                raise ValueError(f"candidate {self.name}: overrides and imatrix are llama.cpp "
                                 "quantization settings; an onnx candidate is built already")
        elif self.folder is not None:
            raise ValueError(f"candidate {self.name}: folder is for onnx candidates; a gguf "
                             "one is quantized from source.file")
        return self

    @field_validator("overrides")
    @classmethod
    def _known_overrides(cls, value: dict[str, str]) -> dict[str, str]:
        checked = {}
        for pattern, kind in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"override pattern {pattern!r} does not compile: {exc}") from None
            tensor_type(kind)
            checked[pattern] = kind.upper()
        return checked

    @property
    def quantization(self) -> str:
        """The manifest's ``quantization``: the type, or the name when tensors differ
        or an importance matrix weighed the rounding."""
        return self.type if not (self.overrides or self.imatrix) else self.name


class TierBudget(_Strict):
    """The devices a tier's variant must fit (protocol.fit_check's figures)."""

    ram_bytes: Annotated[int, Field(ge=1)]
    os_reserved_bytes: Annotated[int, Field(ge=0)] = 0
    disk_free_bytes: Annotated[int, Field(ge=1)] = 1 << 40
    #: the runtime context the tier's devices allocate; RAM is measured at it
    context: Annotated[int, Field(ge=16)] = 2048
    #: generations decoded at once (a firmware profile's ``runtime.parallel``)
    slots: Annotated[int, Field(ge=1)] = 1
    #: the format the tier's devices run (an NPU laptop's profile: ``onnx``); only
    #: candidates of this format are judged for the tier
    format: Format = "gguf"
    #: this tier's quality floors, in place of the spec's (None: the spec's)
    floors: Floors | None = None


class ReleaseFields(_Strict):
    """What every emitted variant carries besides its file and measured figures."""

    description: str = ""
    runtime_defaults: RuntimeDefaults = Field(default_factory=RuntimeDefaults)
    health_check: HealthCheck


class BuildSpec(_Strict):
    """A whole build: source, candidates, how they are measured and judged, the tiers."""

    name: Annotated[str, StringConstraints(pattern=RELEASE_NAME_PATTERN)]
    version: Annotated[str, StringConstraints(max_length=64, pattern=SEMVER_PATTERN)]
    source: Source
    held_out: HeldOut
    eval_set: Path
    floors: Floors = Field(default_factory=Floors)
    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=32)]
    tiers: Annotated[dict[Tier, TierBudget], Field(min_length=1)]
    release: ReleaseFields
    #: CPU threads for quantizing and measuring
    threads: Annotated[int, Field(ge=1, le=256)] = 2

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, value: list[Candidate]) -> list[Candidate]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError("two candidates share a name")
        return value

    def contexts(self) -> list[int]:
        """The distinct runtime contexts RAM is measured at, one per tier budget."""
        return sorted({budget.context for budget in self.tiers.values()})


def _resolve(base: Path, path: Path) -> Path:
    expanded = Path(os.path.expandvars(os.path.expanduser(str(path))))
    return expanded if expanded.is_absolute() else base / expanded


def load_build_spec(path: Path) -> BuildSpec:
    """Read a build spec; its paths come back absolute, resolved against its directory."""
    source = f"build spec {path}"
    try:
        doc = parse_yaml_mapping(path.read_bytes(), source, max_bytes=MAX_SPEC_BYTES)
        spec = BuildSpec.model_validate(doc)
    except FileNotFoundError:
        raise BuildSpecError(f"build spec {path} does not exist") from None
    except ValidationError as exc:
        raise BuildSpecError(f"{source}: {validation_problems(exc, root='(root)')}") from exc
    except ValueError as exc:
        raise BuildSpecError(str(exc)) from exc
    base = path.resolve().parent
    spec = spec.model_copy(update={
        "source": spec.source.model_copy(update={"file": _resolve(base, spec.source.file)}),
        "held_out": spec.held_out.model_copy(update={"text": _resolve(base, spec.held_out.text)}),
        "eval_set": _resolve(base, spec.eval_set),
    })
    candidates = [c.model_copy(update={
        "imatrix": c.imatrix and _resolve(base, c.imatrix),
        "folder": c.folder and _resolve(base, c.folder)}) for c in spec.candidates]
    spec = spec.model_copy(update={"candidates": candidates})
    files = [("source.file", spec.source.file), ("held_out.text", spec.held_out.text),
             ("eval_set", spec.eval_set)]
    files += [(f"candidates.{c.name}.imatrix", c.imatrix) for c in candidates if c.imatrix]
    for what, file in files:
        if not file.is_file():
            raise BuildSpecError(f"{source}: {what}: {file} does not exist")
    for c in candidates:
        if c.folder is not None and not (c.folder / "genai_config.json").is_file():
            unset = " (a variable in it is not set)" if "$" in str(c.folder) else ""
            raise BuildSpecError(f"{source}: candidates.{c.name}.folder: {c.folder} is not an "
                                 f"onnxruntime-genai model folder (no genai_config.json){unset}")
    for tier, budget in spec.tiers.items():
        if not any(c.format == budget.format for c in candidates):
            raise BuildSpecError(f"{source}: tiers.{tier.value}: its devices run "
                                 f"{budget.format} and no candidate is {budget.format}")
    return spec
