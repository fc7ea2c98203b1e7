"""Integers between two bounds as GBNF digit sequences, the way llama.cpp builds them.

``minimum``/``maximum`` of a JSON Schema integer cannot be checked after
sampling; they are enforced by a grammar that only spells integers in
range: split by digit count, then per leading digit (``105..1999`` is
``"1" "0" [5-9] | "1" [1-9] [0-9] | ...``). Stdlib only.
"""

from __future__ import annotations

#: digits an integer may have (llama.cpp uses the same cap)
MAX_DIGITS = 16


def _classes(lo: str, hi: str) -> list[list[str]]:
    """Digit strings of equal length from ``lo`` to ``hi``, as alternatives of digit classes."""
    if lo[0] == hi[0]:
        if len(lo) == 1:
            return [[lo[0]]]
        return [[lo[0], *rest] for rest in _classes(lo[1:], hi[1:])]
    n = len(lo) - 1
    cls = lambda a, b: a if a == b else f"{a}-{b}"  # noqa: E731
    if n == 0:
        return [[cls(lo, hi)]]
    zeros, nines = "0" * n, "9" * n
    out: list[list[str]] = []
    first = lo[0] if lo[1:] == zeros else chr(ord(lo[0]) + 1)
    last = hi[0] if hi[1:] == nines else chr(ord(hi[0]) - 1)
    if lo[1:] != zeros:
        out += [[lo[0], *rest] for rest in _classes(lo[1:], nines)]
    if first <= last:
        out.append([cls(first, last)] + ["0-9"] * n)
    if hi[1:] != nines:
        out += [[hi[0], *rest] for rest in _classes(zeros, hi[1:])]
    return out


def digit_alternatives(lo: int, hi: int) -> list[list[str]]:
    """Decimal strings (no leading zeros) of ``lo`` <= n <= ``hi``, both >= 0.

    Each alternative is a list of digit classes (``"3"``, ``"0-9"``); split
    by length first, so every class sequence has one length.
    """
    if not 0 <= lo <= hi:
        raise ValueError(f"bad range {lo}..{hi}")
    out = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        start = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
        end = min(hi, 10 ** digits - 1)
        if start <= end:
            out += _classes(str(start), str(end))
    return out


def _gbnf_digits(alternatives: list[list[str]]) -> str:
    parts = []
    for alt in alternatives:
        seq: list[str] = []
        for c in alt:
            seq.append(f'"{c}"' if len(c) == 1 else f"[{c}]")
        # [0-9] [0-9] [0-9] -> [0-9]{3}: shorter grammars parse faster
        merged: list[str] = []
        for item in seq:
            if merged and merged[-1].startswith("[0-9]") and item == "[0-9]":
                count = int(merged[-1][6:-1]) + 1 if "{" in merged[-1] else 2
                merged[-1] = f"[0-9]{{{count}}}"
            else:
                merged.append(item)
        parts.append(" ".join(merged))
    return " | ".join(parts)


def integer_range(lo: int | None, hi: int | None) -> str:
    """GBNF (without trailing space) for integers in [lo, hi]; None is unbounded."""
    biggest = 10 ** MAX_DIGITS - 1
    lo = -biggest if lo is None else max(lo, -biggest)
    hi = biggest if hi is None else min(hi, biggest)
    alts = []
    if lo < 0:  # the negative part: "-" then |n| in [max(1, -hi), -lo]
        neg_lo, neg_hi = max(1, -hi), -lo
        if neg_lo <= neg_hi:
            alts.append(f'"-" ({_gbnf_digits(digit_alternatives(neg_lo, neg_hi))})')
    if hi >= 0:
        alts.append(_gbnf_digits(digit_alternatives(max(lo, 0), hi)))
    return " | ".join(f"({a})" for a in alts)
