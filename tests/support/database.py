"""Which database the control-plane tests run on.

Control-plane test modules run twice, on SQLite and on PostgreSQL (the
``database_backend`` fixture in ``tests/conftest.py``). The helpers that
build control planes (:func:`tests.support.controlplane.cp_settings`,
:func:`tests.support.registry.registry_api`) ask :func:`fresh_url` for a
database: ``None`` means the default SQLite file in the control plane's
data dir, otherwise a new, empty PostgreSQL database for each control plane,
so tests stay as isolated as they are on SQLite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_factory: Callable[[], str] | None = None


def use(factory: Callable[[], str] | None) -> None:
    """Make :func:`fresh_url` call ``factory`` (None: back to SQLite)."""
    global _factory
    _factory = factory


def fresh_url() -> str | None:
    """A new database's URL on the current backend, or None for the SQLite default."""
    return _factory() if _factory is not None else None


def settings(given: dict[str, Any]) -> dict[str, Any]:
    """``{"database_url": ...}`` for a new control plane, unless ``given`` names one."""
    if "database_url" in given:
        return {}
    url = fresh_url()
    return {"database_url": url} if url else {}
