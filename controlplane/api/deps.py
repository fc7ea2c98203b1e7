"""Dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from controlplane.auth.middleware import PRINCIPAL_KEY
from controlplane.auth.tokens import Principal
from controlplane.context import AppContext


def get_context(request: Request) -> AppContext:
    """The :class:`AppContext` the app was built with."""
    return request.app.state.context


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """A database session for one request."""
    with context.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request) -> Principal | None:
    """The token the request was authenticated with (None on open routes)."""
    return getattr(request.state, PRINCIPAL_KEY, None)


PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
