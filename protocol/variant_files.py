"""Multi-file variants: a model that is a folder, listed file by file.

An onnxruntime-genai model is a folder (``model.onnx``, ``model.onnx.data``,
``genai_config.json``, tokenizer files). Its variant lists every file with
its path, sha256 and size, as TUF lists targets; the release signature
covers the list, so a file added, dropped, renamed or swapped in from
another release is a mismatch the agent refuses.

The variant's own ``sha256`` and ``size_bytes`` then describe the whole:
``sha256`` is :func:`files_digest` of the list (one identity for the folder,
used wherever a single-file variant's hash is: stores, telemetry, the
control plane's views), ``size_bytes`` the sum of the files' sizes.

Each file is fetched from ``<artifact base>/<variant.artifact>/<file.path>``
and installed at ``<folder>/<file.path>``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Annotated

from pydantic import Field, StringConstraints, field_validator

from .canonical import canonical_json
from .messages import Wire

#: a folder model with more files than this is not one anyone ships
MAX_VARIANT_FILES = 64
#: a file path inside a variant folder, at most this long
MAX_FILE_PATH = 200

_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def check_relative_path(value: str, what: str) -> str:
    """Return ``value`` if it is a relative path of safe segments, else raise ``ValueError``.

    The agent joins such a path to a base URL and to a directory it owns: an
    absolute path, ``.``/``..``, ``%``, ``?``, ``#``, a backslash or an empty
    segment could step outside either.
    """
    for segment in value.split("/"):
        if not _SEGMENT_RE.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(
                f"{what} must be a relative path of [A-Za-z0-9._-] segments, without '.' or '..'"
            )
    return value


class VariantFile(Wire):
    """One file of a folder variant."""

    #: path inside the variant folder, e.g. ``model.onnx`` or ``tokenizer/vocab.json``
    path: Annotated[str, StringConstraints(min_length=1, max_length=MAX_FILE_PATH)]
    sha256: _Sha256
    size_bytes: Annotated[int, Field(strict=True, ge=0, le=1 << 40)]

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return check_relative_path(value, "a variant file's path")


def files_digest(files: Sequence[VariantFile]) -> str:
    """The folder's identity: sha256 of the canonical JSON of its file list, sorted by path.

    Order-independent, and any change to a path, hash or size changes it.
    """
    entries = sorted(
        ({"path": f.path, "sha256": f.sha256, "size_bytes": f.size_bytes} for f in files),
        key=lambda entry: entry["path"],
    )
    return hashlib.sha256(canonical_json(entries)).hexdigest()


def check_file_list(files: Sequence[VariantFile], *, sha256: str, size_bytes: int) -> None:
    """Raise ``ValueError`` unless ``files`` is a consistent folder for that digest and size.

    Refused: no files or too many; two paths equal when case is ignored (one
    would overwrite the other on a case-insensitive disk); a path that is
    also another's folder (``a`` and ``a/b``); sizes that do not add up to
    ``size_bytes``; a list whose :func:`files_digest` is not ``sha256``.
    """
    if not files:
        raise ValueError("files must list at least one file")
    if len(files) > MAX_VARIANT_FILES:
        raise ValueError(f"files lists {len(files)} files, at most {MAX_VARIANT_FILES}")
    folded = [f.path.lower() for f in files]
    if len(set(folded)) != len(folded):
        raise ValueError("two files share a path (ignoring case)")
    as_folders = {path + "/" for path in folded}
    for path in folded:
        for folder in as_folders:
            if path.startswith(folder):
                raise ValueError(f"{path!r} lies inside a path that is a file")
    total = sum(f.size_bytes for f in files)
    if total != size_bytes:
        raise ValueError(f"files add up to {total} bytes, size_bytes says {size_bytes}")
    digest = files_digest(files)
    if digest != sha256:
        raise ValueError(f"sha256 must be the digest of the file list ({digest})")
