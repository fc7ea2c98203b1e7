"""Reading the small text files the capability probes look at, and fitting them to the wire."""

from __future__ import annotations

from pathlib import Path

#: Longest string the wire accepts in a ``ShortStr`` field.
SHORT_MAX = 128


def read_text(path: Path) -> str:
    """The file's text without NULs (devicetree strings end in one), or ``""``."""
    try:
        return path.read_bytes().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def short_text(text: str) -> str:
    """``text`` stripped and cut to what a ``ShortStr`` field accepts."""
    return text.strip()[:SHORT_MAX]
