"""The types a GGUF file's tensors really hold, read from its tensor table.

llama.cpp falls back to another type where a tensor's rows do not divide
into the asked type's blocks (SmolLM2-135M's width of 576 is not a multiple
of 256, so K-quants mostly become Q4_0/Q5_0), and keeps some tensors
(norms) in F32. The build reports what each file holds, not what was asked.

The tensor table follows the metadata section, whose length
:func:`agent.gguf.read_metadata_entries` gives entry by entry::

    tensor = name (u64 length + UTF-8) | n_dims u32 | dims u64 * n_dims | type u32 | offset u64
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agent.gguf import GgufError, read_metadata_entries

from .quant_types import tensor_type_name

#: magic, version, tensor count, metadata count
_HEADER_BYTES = 4 + 4 + 8 + 8
MAX_TENSORS = 1 << 16
MAX_NAME_BYTES = 1024
MAX_DIMS = 8


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a GGUF file: its name, shape and stored type."""

    name: str
    shape: tuple[int, ...]
    type: str


def read_tensors(path: Path) -> list[TensorInfo]:
    """Every tensor of the GGUF at ``path``, in file order (GgufError when malformed)."""
    entries = read_metadata_entries(path)
    with open(path, "rb") as f:
        f.seek(8)
        (count,) = struct.unpack("<Q", f.read(8))
        if count > MAX_TENSORS:
            raise GgufError(f"GGUF declares {count} tensors")
        f.seek(_HEADER_BYTES + sum(len(raw) for raw in entries.values()))
        tensors = []
        for _ in range(count):
            (name_len,) = _unpack(f, "<Q")
            if name_len > MAX_NAME_BYTES:
                raise GgufError(f"GGUF tensor name of {name_len} bytes")
            name = f.read(name_len).decode("utf-8", errors="replace")
            (n_dims,) = _unpack(f, "<I")
            if n_dims > MAX_DIMS:
                raise GgufError(f"GGUF tensor {name} has {n_dims} dimensions")
            shape = _unpack(f, f"<{n_dims}Q")
            type_id, _offset = _unpack(f, "<IQ")
            tensors.append(TensorInfo(name, tuple(shape), tensor_type_name(type_id)))
        return tensors


def _unpack(f: object, fmt: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)  # type: ignore[attr-defined]
    if len(data) != size:
        raise GgufError("GGUF file ends inside its tensor table")
    return struct.unpack(fmt, data)


def type_counts(tensors: list[TensorInfo]) -> dict[str, int]:
    """How many tensors hold each type, most common first."""
    return dict(Counter(t.type for t in tensors).most_common())
