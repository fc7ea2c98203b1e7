"""What several pages share: the database session, the active-models list, paging."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from controlplane.context import AppContext

#: rows on one page unless asked otherwise, and at most
PAGE_SIZE = 50
PAGE_MAX = 200


def context_of(request: Request) -> AppContext:
    """The control plane's shared context."""
    return request.app.state.context


def db_session(request: Request) -> Iterator[Session]:
    """A database session for one page."""
    with context_of(request).sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(db_session)]
Context = Annotated[AppContext, Depends(context_of)]


def active_models(active: Any) -> list[tuple[str, str]]:
    """``(name, version)`` of every model a device runs, by name.

    A device reports one active model today (``{"name", "version", ...}``);
    a list of those (``hello/2``'s ``models``) or a per-name map
    (``{name: {"version": ...}}`` or ``{name: version}``) is read the same
    way, so a device running several shows them all.
    """
    if isinstance(active, list):
        return sorted(pair for entry in active for pair in active_models(entry))
    if not isinstance(active, dict) or not active:
        return []
    if isinstance(active.get("name"), str):
        return [(active["name"], str(active.get("version", "?")))]
    out = []
    for name, entry in active.items():
        version = entry.get("version", "?") if isinstance(entry, dict) else entry
        out.append((str(name), str(version)))
    return sorted(out)


def page_size(raw: str | None) -> int:
    """The ``limit`` a page was asked for, within 1..:data:`PAGE_MAX`."""
    try:
        return max(1, min(PAGE_MAX, int(raw))) if raw else PAGE_SIZE
    except ValueError:
        return PAGE_SIZE
