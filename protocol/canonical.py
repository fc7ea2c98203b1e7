"""Canonical JSON: the exact bytes that get signed.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity. Two parties
that agree on a value agree on these bytes, so a signature made over them by
one verifies for the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` to canonical JSON bytes.

    Raises ``ValueError`` for values JSON cannot represent exactly (NaN,
    infinities) rather than emitting something a verifier would parse
    differently.
    """
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def canonical_object(fields: Mapping[str, Any], encoded: Mapping[str, bytes]) -> bytes:
    """``canonical_json`` of the object ``fields`` plus ``encoded``, whose values are
    given already as canonical JSON bytes.

    Byte for byte what ``canonical_json({**fields, **decoded(encoded)})`` gives,
    without encoding a large shared value again for every object that embeds
    it (a director signs thousands of assignments embedding one release).
    """
    if fields.keys() & encoded.keys():
        raise ValueError("a key is given both as a value and encoded")
    # The plain fields between two encoded keys are encoded together, one
    # dumps each run instead of one per key and one per value: this runs once
    # per device when a stage of thousands of devices is signed.
    parts: list[bytes] = []
    run: dict[str, Any] = {}
    for key in sorted({*fields, *encoded}):
        if key not in encoded:
            run[key] = fields[key]
            continue
        if run:
            parts.append(canonical_json(run)[1:-1])
            run = {}
        parts.append(canonical_json(key) + b":" + encoded[key])
    if run:
        parts.append(canonical_json(run)[1:-1])
    return b"{" + b",".join(parts) + b"}"
