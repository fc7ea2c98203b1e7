"""The build directory: each variant's file and figures, kept for the next build.

Layout, under the build directory::

    <source sha256[:16]>/
        source/measure-<key>.json           the source's own figures
        <candidate>-<variant key>/
            <name>-<candidate>.gguf         the quantized file
            quantize.log                    llama.cpp's output
            quantize.json                   sha256, seconds, per-tensor types
            measure-<key>.json              its figures

The variant key hashes what makes the file (source sha256, type, overrides,
importance matrix, llama-cpp-python version); the measurement key adds what makes the
figures (held-out text, eval set, contexts, threads). A build that stops
half way resumes from the variants whose files and figures are written
(each written whole, by rename); a second build of the same spec measures
nothing again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.atomic import read_json, write_json_atomic

from .onnx import folder_digest
from .spec import BuildSpec, Candidate

#: bumped when the way a file is made or measured changes, so old figures are not reused
QUANTIZE_FORMAT = 1
MEASURE_FORMAT = 2


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


@dataclass(frozen=True, slots=True)
class BuildStore:
    """Where one source's variants and figures live."""

    root: Path
    source_sha256: str
    #: hash of what the measurements depend on beyond the file itself
    measure_key: str

    @classmethod
    def open(cls, build_dir: Path, spec: BuildSpec, source_sha256: str) -> BuildStore:
        """The store for ``spec``'s source under ``build_dir``."""
        measure_key = _key({
            "format": MEASURE_FORMAT,
            "held_out": file_sha256(spec.held_out.text),
            "ppl_context": spec.held_out.context,
            "ppl_chunks": spec.held_out.chunks,
            "eval_set": file_sha256(spec.eval_set),
            "contexts": spec.contexts(),
            "threads": spec.threads,
            "llama_cpp": _llama_cpp_version(),
        })
        root = build_dir / source_sha256[:16]
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, source_sha256, measure_key)

    def variant_dir(self, candidate: Candidate) -> Path:
        """The candidate's directory (its key: source, type, overrides, llama.cpp version)."""
        if candidate.folder is not None:
            # an ONNX candidate is not made from the source: its folder is what it is
            key = _key({"format": QUANTIZE_FORMAT, "onnx": folder_digest(candidate.folder)})
            return self.root / f"{candidate.name}-{key}"
        key = _key({"format": QUANTIZE_FORMAT, "source": self.source_sha256,
                    "type": candidate.type, "overrides": candidate.overrides,
                    "imatrix": candidate.imatrix and file_sha256(candidate.imatrix),
                    "llama_cpp": _llama_cpp_version()})
        return self.root / f"{candidate.name}-{key}"

    def source_dir(self) -> Path:
        """Where the source's own figures are kept."""
        return self.root / "source"

    def measurement_path(self, directory: Path) -> Path:
        """The figures file for this store's measurement settings."""
        return directory / f"measure-{self.measure_key}.json"

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """A JSON record written by :meth:`write`, or None when there is none yet."""
        return read_json(path)

    @staticmethod
    def write(path: Path, value: dict[str, Any]) -> None:
        """Write a JSON record whole (temp file and rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, value, mode=0o644)
