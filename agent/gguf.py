"""Read the metadata header of a GGUF file: enough to fingerprint its tokenizer.

A GGUF file carries its tokenizer inside the metadata key-value section
(``tokenizer.ggml.model``, ``.tokens``, ``.merges``, ``.token_type``,
special token ids, ``tokenizer.chat_template``), ahead of the tensors. So
the release-signed artifact sha256 already pins the tokenizer: a GGUF with a
swapped tokenizer is a different file and fails its hash. A variant may also
state ``tokenizer_sha256`` to catch a *release* stitched together from
another release's pieces; :func:`tokenizer_sha256` is how the agent computes
the value to compare it with.

Definition (the release tooling must compute the same): take every metadata
entry whose key starts with ``tokenizer.``, each as its exact bytes in the
file (key length, key, value type, value), sort them by key, and hash the
concatenation with SHA-256. Sorting makes the fingerprint independent of the
order a converter wrote the keys in; raw bytes make it independent of any
parser's interpretation.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64 | kv * kv_count | ...
    kv    = key (u64 length + UTF-8) | value_type u32 | value
    value = fixed-size scalar | string (u64 length + bytes) | array (type u32, count u64, items)

Every length is bounded before it is trusted: the file was hash-verified
against a signed manifest, but the reader must not be the weak spot if it is
ever pointed at anything else.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import BinaryIO

__all__ = ["GgufError", "read_metadata_entries", "tokenizer_sha256"]

_MAGIC = b"GGUF"
#: fixed sizes of the scalar value types, by GGUF type id
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
#: bounds: a 256k-token vocabulary with merges is a few MB of metadata
MAX_KV_COUNT = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24
MAX_ARRAY_ITEMS = 1 << 24
MAX_METADATA_BYTES = 256 << 20
TOKENIZER_PREFIX = "tokenizer."


class GgufError(ValueError):
    """The file is not a GGUF this reader understands, or exceeds its bounds."""


class _Reader:
    """Bounded sequential reads that also record the bytes read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.total = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.total + n > MAX_METADATA_BYTES:
            raise GgufError(f"GGUF metadata larger than {MAX_METADATA_BYTES} bytes")
        data = self._f.read(n)
        if len(data) != n:
            raise GgufError("GGUF file ends inside its metadata")
        self.total += n
        return data

    def u32(self) -> tuple[int, bytes]:
        raw = self.take(4)
        return struct.unpack("<I", raw)[0], raw

    def u64(self) -> tuple[int, bytes]:
        raw = self.take(8)
        return struct.unpack("<Q", raw)[0], raw


def _value(r: _Reader, value_type: int, depth: int = 0) -> bytes:
    """Read one value of ``value_type``; return its exact bytes."""
    if value_type in _SCALAR_SIZES:
        return r.take(_SCALAR_SIZES[value_type])
    if value_type == _STRING:
        n, raw = r.u64()
        if n > MAX_STRING_BYTES:
            raise GgufError(f"GGUF string of {n} bytes")
        return raw + r.take(n)
    if value_type == _ARRAY:
        if depth > 2:
            raise GgufError("GGUF arrays nested too deeply")
        item_type, raw_type = r.u32()
        count, raw_count = r.u64()
        if count > MAX_ARRAY_ITEMS:
            raise GgufError(f"GGUF array of {count} items")
        parts = [raw_type, raw_count]
        if item_type in _SCALAR_SIZES:
            parts.append(r.take(count * _SCALAR_SIZES[item_type]))
        else:
            parts.extend(_value(r, item_type, depth + 1) for _ in range(count))
        return b"".join(parts)
    raise GgufError(f"unknown GGUF value type {value_type}")


def read_metadata_entries(path: str | Path) -> dict[str, bytes]:
    """Every metadata entry of the GGUF at ``path``: key -> its exact bytes in the file.

    Raises :class:`GgufError` for anything that is not a well-formed GGUF
    v2/v3 header within the bounds above.
    """
    with open(path, "rb") as f:
        r = _Reader(f)
        if r.take(4) != _MAGIC:
            raise GgufError(f"{path} is not a GGUF file")
        version, _ = r.u32()
        if version not in (2, 3):
            raise GgufError(f"unsupported GGUF version {version}")
        r.u64()  # tensor count: the tensors follow the metadata; not needed
        kv_count, _ = r.u64()
        if kv_count > MAX_KV_COUNT:
            raise GgufError(f"GGUF declares {kv_count} metadata entries")
        entries: dict[str, bytes] = {}
        for _ in range(kv_count):
            key_len, raw_len = r.u64()
            if key_len > MAX_KEY_BYTES:
                raise GgufError(f"GGUF metadata key of {key_len} bytes")
            raw_key = r.take(key_len)
            value_type, raw_type = r.u32()
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GgufError("GGUF metadata key is not UTF-8") from exc
            if key in entries:
                # Two readers keeping different duplicates would disagree on the tokenizer.
                raise GgufError(f"GGUF metadata key {key!r} appears twice")
            entries[key] = raw_len + raw_key + raw_type + _value(r, value_type)
        return entries


def tokenizer_sha256(path: str | Path) -> str | None:
    """The tokenizer fingerprint of a GGUF (module docstring); ``None`` if it has no tokenizer."""
    entries = read_metadata_entries(path)
    keys = sorted(k for k in entries if k.startswith(TOKENIZER_PREFIX))
    if not keys:
        return None
    digest = hashlib.sha256()
    for key in keys:
        digest.update(entries[key])
    return digest.hexdigest()
