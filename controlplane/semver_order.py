"""An order-preserving text encoding of semantic versions, for SQL ``ORDER BY``.

:func:`sort_key` maps a semver string to lowercase hex such that comparing
two keys byte by byte gives semver 2.0.0 precedence, the same order as
:func:`protocol.semver_key`. Stored beside each model version, it lets the
database sort and paginate versions with an index instead of loading them all.

Encoding, before hex:

* major, minor, patch: 8 bytes big-endian each;
* a pre-release: ``01``, then per identifier either ``01`` + 8-byte number
  (numeric identifiers sort numerically and before alphanumeric ones) or
  ``02`` + its ASCII + ``00`` (the terminator sorts a prefix first, so
  ``a`` < ``a-b``); a shorter identifier list is a prefix, so it sorts first;
* no pre-release: ``02``, after every pre-release of the same version.

Build metadata is ignored, as semver precedence ignores it. Hex keeps every
key in ``[0-9a-f]``, which sorts the same under any collation.
"""

from __future__ import annotations

import re

from protocol import SEMVER_PATTERN

_SEMVER_RE = re.compile(SEMVER_PATTERN)
_MAX_NUMBER = (1 << 64) - 1


def _number(text: str) -> bytes:
    value = int(text)
    if value > _MAX_NUMBER:
        raise ValueError(f"version number {text} is too large to order (max {_MAX_NUMBER})")
    return value.to_bytes(8, "big")


def sort_key(version: str) -> str:
    """The order-preserving key of ``version``; ``ValueError`` if it is not semver."""
    match = _SEMVER_RE.fullmatch(version)
    if match is None or len(version) > 64:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, prerelease = (match.group(i) for i in range(1, 5))
    out = bytearray(_number(major) + _number(minor) + _number(patch))
    if prerelease is None:
        out += b"\x02"
    else:
        out += b"\x01"
        for part in prerelease.split("."):
            if part.isdigit():
                out += b"\x01" + _number(part)
            else:
                out += b"\x02" + part.encode("ascii") + b"\x00"
    return out.hex()
