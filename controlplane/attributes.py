"""Carry attributes over between objects that name them alike."""

from __future__ import annotations

from typing import Any


def same_named(source: object, *names: str) -> dict[str, Any]:
    """``{name: source.name}`` for each of ``names``: keyword arguments that
    hand ``source``'s attributes to a constructor whose parameters share their names."""
    return {name: getattr(source, name) for name in names}
