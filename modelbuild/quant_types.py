"""Quantization types by name: llama.cpp's file types (``ftype``) and tensor types.

The names are llama.cpp's own (``Q8_0``, ``IQ4_NL``, ``Q2_0``): a file type
names the default tensor type of a quantized file, a tensor type is what
one tensor holds (and what a per-tensor override asks for). Both tables come
from the llama-cpp-python bindings, so a type the vendored llama.cpp does not
know is refused by name before anything runs.
"""

from __future__ import annotations

import llama_cpp

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
_TYPE_PREFIX = "GGML_TYPE_"

#: file type name -> llama_ftype value (``Q8_0`` -> 7)
FILE_TYPES: dict[str, int] = {
    name.removeprefix(_FTYPE_PREFIX): value
    for name, value in vars(llama_cpp).items()
    if name.startswith(_FTYPE_PREFIX) and isinstance(value, int)
}
#: tensor type name -> ggml_type value (``Q2_0`` -> 42)
TENSOR_TYPES: dict[str, int] = {
    name.removeprefix(_TYPE_PREFIX): value
    for name, value in vars(llama_cpp).items()
    if name.startswith(_TYPE_PREFIX) and isinstance(value, int) and name != "GGML_TYPE_COUNT"
}
# The bindings list no BF16/TQ tensor types; the GGUF format fixes their ids.
TENSOR_TYPES.setdefault("BF16", 30)
TENSOR_TYPES.setdefault("TQ1_0", 34)
TENSOR_TYPES.setdefault("TQ2_0", 35)
_TYPE_NAMES = {value: name for name, value in TENSOR_TYPES.items()}


def _lookup(table: dict[str, int], name: str, what: str) -> int:
    try:
        return table[name.upper()]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ValueError(f"unknown {what} {name!r} (llama.cpp knows: {known})") from None


def file_type(name: str) -> int:
    """The llama_ftype for ``name``; ValueError naming the known ones otherwise."""
    return _lookup(FILE_TYPES, name, "quantization type")


def tensor_type(name: str) -> int:
    """The ggml_type for ``name``; ValueError naming the known ones otherwise."""
    return _lookup(TENSOR_TYPES, name, "tensor type")


def tensor_type_name(value: int) -> str:
    """The name of ggml_type ``value`` (``type<N>`` for one this build does not name)."""
    return _TYPE_NAMES.get(value, f"type{value}")
