"""Canonical JSON: the exact bytes that get signed.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity. Two parties
that agree on a value agree on these bytes, so a signature made over them by
one verifies for the other.
"""

from __future__ import annotations

import json
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
