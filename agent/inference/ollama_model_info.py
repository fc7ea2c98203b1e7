"""What Ollama's ``/api/tags``, ``/api/show`` and ``/api/ps`` say about a model, read
from the served file: ``details`` (family, parameter size, quantization),
``model_info`` (the GGUF metadata) and the chat template.

The metadata comes from :func:`agent.gguf.read_metadata_entries`, which
returns each entry's exact bytes; this module decodes the values. Arrays
(the tokenizer's vocabulary: hundreds of thousands of items) are listed
empty unless ``verbose`` asks for them, as Ollama does.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from pathlib import Path
from typing import Any

from ..gguf import GgufError, read_metadata_entries

#: struct format of the GGUF scalar types, by type id
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

#: llama.cpp's ``general.file_type`` (enum llama_ftype) as Ollama names it
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}
TEMPLATE_KEY = "tokenizer.chat_template"


def _decode(raw: bytes, offset: int, kind: int, arrays: bool) -> tuple[Any, int]:
    """(value, offset after it) of one value of type ``kind`` at ``offset``."""
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, raw, offset)[0], offset + struct.calcsize(fmt)
    if kind == _STRING:
        (n,) = struct.unpack_from("<Q", raw, offset)
        start = offset + 8
        return raw[start:start + n].decode("utf-8", "replace"), start + n
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", raw, offset)
        offset += 12
        if not arrays:
            return [], len(raw)
        items = []
        for _ in range(count):
            value, offset = _decode(raw, offset, item, arrays)
            items.append(value)
        return items, offset
    raise GgufError(f"unknown GGUF value type {kind}")


def _metadata(path: Path, arrays: bool) -> dict[str, Any]:
    """Every metadata entry of the GGUF at ``path``, decoded."""
    out = {}
    for key, raw in read_metadata_entries(path).items():
        # An entry is: key length u64 | key | value type u32 | value.
        start = 8 + len(key.encode())
        (kind,) = struct.unpack_from("<I", raw, start)
        out[key], _ = _decode(raw, start + 4, kind, arrays)
    return out


@functools.lru_cache(maxsize=4)
def _summary(path: Path, sha256: str) -> dict[str, Any]:
    """The metadata without arrays (``sha256`` keys the cache: a new file, a new entry)."""
    try:
        return _metadata(path, arrays=False)
    except (GgufError, OSError, struct.error):
        return {}


def human_count(n: int) -> str:
    """A parameter count as Ollama writes it: ``135M``, ``1.7B``."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            text = f"{n / size:.1f}".removesuffix(".0")
            return f"{text}{unit}"
    return str(n)


def parameter_count(path: Path, sha256: str) -> int | None:
    """The GGUF's ``general.parameter_count``, where the file states it."""
    count = _summary(path, sha256).get("general.parameter_count")
    return count if isinstance(count, int) and count > 0 else None


def details(fmt: str, path: Path, sha256: str) -> dict[str, Any]:
    """Ollama's ``details`` object of a served model."""
    info = _summary(path, sha256) if fmt == "gguf" else {}
    family = str(info.get("general.architecture", ""))
    count = info.get("general.parameter_count")
    size = human_count(count) if isinstance(count, int) else str(info.get("general.size_label",
                                                                            ""))
    return {"parent_model": "", "format": fmt, "family": family,
            "families": [family] if family else None, "parameter_size": size,
            "quantization_level": FILE_TYPES.get(info.get("general.file_type", -1), "")}


def model_info(fmt: str, path: Path, sha256: str, verbose: bool) -> dict[str, Any]:
    """Ollama's ``model_info``: the GGUF metadata, arrays empty unless ``verbose``."""
    if fmt != "gguf":
        return {}
    info = dict(_summary(path, sha256))
    if verbose:
        with contextlib.suppress(GgufError, OSError, struct.error):  # the summary stands
            info = _metadata(path, arrays=True)
    info.pop(TEMPLATE_KEY, None)  # answered as `template`
    return info


def template(fmt: str, path: Path, sha256: str) -> str:
    """The model's chat template (Jinja, as the GGUF carries it; llama.cpp applies it)."""
    return str(_summary(path, sha256).get(TEMPLATE_KEY, "")) if fmt == "gguf" else ""


def license_text(fmt: str, path: Path, sha256: str) -> str:
    """The GGUF's ``general.license`` (an SPDX id, usually)."""
    return str(_summary(path, sha256).get("general.license", "")) if fmt == "gguf" else ""
