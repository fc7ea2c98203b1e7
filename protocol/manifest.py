"""Release manifests: what a model version *is*, signed by the release keys.

A :class:`ReleaseManifest` names a model version and gives one
:class:`Variant` per hardware tier: the artifact's hash, size and path, what
it needs to run, the runtime settings to start with, and the health check
the agent runs before it moves traffic over (DESIGN.md "Trust: two
signatures"). Release keys are held offline; the control plane stores the
signed manifest but cannot forge one.

Pure: :func:`sign_release` and :func:`verify_release` take values and keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from .adapter import ADAPTER_FORMAT, AdapterBase, check_adapter_release
from .canonical import canonical_json
from .eval_set import EvalSetRef
from .keys import (
    KeyList,
    PositiveInt,
    Signatures,
    SignedPart,
    Timestamp,
    make_envelope,
    verify_envelope,
)
from .messages import Strict, Tier, Wire
from .signing import SigningKey
from .variant_files import MAX_VARIANT_FILES, VariantFile, check_file_list, check_relative_path

RELEASE_SCHEMA = "slmfleet.release/1"

#: a release must fit inside an assignment with room for the director's fields
#: and signature (see ``MAX_ASSIGNMENT_BYTES``); three variants with golden
#: prompts take a few KiB, so 48 KiB is generous
MAX_RELEASE_BYTES = 48 * 1024
#: no single artifact is larger than 1 TiB; bounds the download cap it implies
MAX_ARTIFACT_BYTES = 1 << 40

RELEASE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
#: semver.org 2.0.0's own regex, with ``[0-9]`` for ``\d`` (which matches any
#: Unicode digit in both Python and Rust regex engines)
SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SEMVER_RE = re.compile(SEMVER_PATTERN)

ReleaseName = Annotated[str, StringConstraints(pattern=RELEASE_NAME_PATTERN)]
SemVer = Annotated[str, StringConstraints(max_length=64, pattern=SEMVER_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
NonNegFloat = Annotated[float, Field(strict=True, ge=0)]
StrictBool = Annotated[bool, Field(strict=True)]
VariantFiles = Annotated[list[VariantFile], Field(min_length=1, max_length=MAX_VARIANT_FILES)]


def semver_key(version: str) -> tuple[Any, ...]:
    """Sort key giving semver 2.0.0 precedence; raise ``ValueError`` if not semver.

    A pre-release sorts before its release; pre-release identifiers compare
    numerically when numeric, in ASCII order otherwise, numeric before
    alphanumeric, and a longer list wins when all shared ones are equal.
    Build metadata is ignored, so ``1.0.0+a`` and ``1.0.0+b`` tie.
    """
    match = _SEMVER_RE.fullmatch(version)
    if match is None or len(version) > 64:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, prerelease = (match.group(i) for i in range(1, 5))
    if prerelease is None:
        pre: tuple[Any, ...] = (1,)  # a release outranks all of its pre-releases
    else:
        fields = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in prerelease.split(".")
        )
        pre = (0, fields)
    return (int(major), int(minor), int(patch), pre)


class GoldenPrompt(Wire):
    """A prompt whose answer must contain any one of ``expected`` (case-insensitive)."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    expected: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=128)]],
        Field(min_length=1, max_length=8),
    ]
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=4096)] = 64


class HealthCheck(Wire):
    """What a new model must show before traffic moves to it."""

    # a pydantic field (its base is in messages.py): each instance gets a copy
    golden_prompts: Annotated[list[GoldenPrompt], Field(max_length=8)] = []  # noqa: RUF012
    #: time to first token, per golden prompt
    max_ttft_ms: PositiveFloat
    #: decode throughput floor; 0 does not gate (embedding models)
    min_tokens_per_s: NonNegFloat = 0.0


class RuntimeDefaults(Wire):
    """Runtime settings to start from; a firmware profile may override them."""

    threads: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = None
    #: llama.cpp layers to offload; -1 offloads all
    gpu_layers: Annotated[int, Field(strict=True, ge=-1, le=100_000)] | None = None
    batch: Annotated[int, Field(strict=True, ge=1, le=65_536)] | None = None
    #: context the runtime allocates; at most the variant's ``context_length``
    context: Annotated[int, Field(strict=True, ge=1, le=1 << 22)] | None = None
    mmap: StrictBool | None = None
    onnx_providers: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=64)]],
            Field(max_length=8),
        ]
        | None
    ) = None
    #: an embedding model: serves ``/v1/embeddings``, not completions
    embeddings: StrictBool = False


class Variant(Wire):
    """One tier's build of a release: the artifact and what it needs to run."""

    #: ``gguf-lora``: a LoRA adapter for the base the release's ``adapter_of`` names
    format: Literal["gguf", "onnx", "gguf-lora"]
    sha256: Sha256
    size_bytes: Annotated[int, Field(strict=True, ge=1, le=MAX_ARTIFACT_BYTES)]
    #: path under the artifact base URL; relative, no ``..``, URL-safe characters
    artifact: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    quantization: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    #: parameter count
    parameters: Annotated[int, Field(strict=True, ge=1, le=10**13)]
    context_length: Annotated[int, Field(strict=True, ge=1, le=1 << 22)]
    #: measured peak RSS at the runtime context; when absent the fit check estimates
    min_ram_bytes: PositiveInt | None = None
    #: disk needed beyond the artifact itself (e.g. ONNX external data); optional
    min_disk_bytes: PositiveInt | None = None
    runtime_defaults: RuntimeDefaults = Field(default_factory=RuntimeDefaults)
    #: lets the agent notice a tokenizer or variant swapped in from another release
    tokenizer_sha256: Sha256 | None = None
    health_check: HealthCheck

    #: a folder variant (e.g. an onnxruntime-genai model): every file it holds;
    #: then ``sha256`` is :func:`files_digest` of this list, ``size_bytes`` the
    #: sum of its sizes, and ``artifact`` the folder under the artifact base URL
    files: VariantFiles | None = None

    @field_validator("artifact")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        return check_relative_path(value, "artifact")

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        defaults = self.runtime_defaults
        if defaults.context is not None and defaults.context > self.context_length:
            raise ValueError(
                f"runtime context {defaults.context} exceeds context_length {self.context_length}"
            )
        if self.format in ("gguf", ADAPTER_FORMAT) and defaults.onnx_providers is not None:
            raise ValueError("onnx_providers is for onnx variants")
        if self.format == "onnx" and defaults.gpu_layers is not None:
            raise ValueError("gpu_layers is for gguf variants")
        # A text model with no golden prompt would pass its health check by
        # merely loading; only embedding models are checked on load and speed.
        if not defaults.embeddings and not self.health_check.golden_prompts:
            raise ValueError("a text-generation variant needs at least one golden prompt")
        if self.files is not None:
            check_file_list(self.files, sha256=self.sha256, size_bytes=self.size_bytes)
        return self

    @property
    def is_folder(self) -> bool:
        """True when the variant is a folder of listed files, not one file."""
        return self.files is not None

    @property
    def runtime_context(self) -> int:
        """The context the runtime allocates: the pinned default or the full length."""
        return self.runtime_defaults.context or self.context_length


class ReleaseManifest(SignedPart):
    """A model release: name, semver version and one variant per tier."""

    schema_: Literal["slmfleet.release/1"] = Field(RELEASE_SCHEMA, alias="schema")
    name: ReleaseName
    version: SemVer
    released_at: Timestamp
    description: Annotated[str, StringConstraints(max_length=2048)] = ""
    variants: Annotated[dict[Tier, Variant], Field(min_length=1)]
    #: questions the agent scores the candidate on during its health check
    eval_set: EvalSetRef | None = None
    #: set for an adapter release: the base it applies to (protocol/adapter.py)
    adapter_of: AdapterBase | None = None

    @model_validator(mode="after")
    def _adapter(self) -> ReleaseManifest:
        check_adapter_release(self)
        return self

    @property
    def ref(self) -> str:
        """``name@version``, for logs and events."""
        return f"{self.name}@{self.version}"


class SignedRelease(Strict):
    """Envelope of a release manifest, signed by a threshold of release keys."""

    signed: ReleaseManifest
    signatures: Signatures


def sign_release(manifest: ReleaseManifest, keys: Sequence[SigningKey]) -> dict[str, Any]:
    """Sign ``manifest`` with each release key; return the envelope as a plain dict.

    Raises ``ValueError`` if the envelope would exceed :data:`MAX_RELEASE_BYTES`
    (devices would refuse it) or a key is given twice.
    """
    envelope = make_envelope(manifest.model_dump(mode="json", by_alias=True), keys)
    size = len(canonical_json(envelope))
    if size > MAX_RELEASE_BYTES:
        raise ValueError(f"signed release is {size} bytes, limit {MAX_RELEASE_BYTES}")
    return envelope


def verify_release(
    envelope: bytes | Mapping[str, Any],
    release_keys: KeyList,
    *,
    now: float | None = None,
) -> ReleaseManifest:
    """Verify a signed release against the pinned release keys; return the manifest.

    ``envelope`` is wire bytes or an already parsed envelope (the release
    embedded in an assignment). With ``now``, an expired release key list is
    refused too. Raises :class:`PayloadTooLarge`, :class:`MalformedPayload`,
    :class:`KeyListExpired`, :class:`ThresholdError` or :class:`SchemaMismatch`.
    """
    if release_keys.role != "release":
        raise ValueError(f"release manifests verify against release keys, not {release_keys.role}")
    # R1: bound and parse; nothing in 'signed' is interpreted before it verifies.
    # R2: freeze of the trust root: a stale pinned list must be rotated first.
    # R3: arbitrary-software check over the raw signed object: a threshold of
    # offline release keys vouch for exactly these bytes.
    # R4: only then interpret it; unknown fields and a foreign schema are refused.
    _, release = verify_envelope(
        envelope, SignedRelease, release_keys, max_bytes=MAX_RELEASE_BYTES,
        what="release manifest", now=now,
    )
    return release.signed
