"""Dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
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


#: the answer for a feature this control plane is not configured for: the
#: routes exist in every build, but here they lead nowhere until a setting is
#: made. Not a 503: nothing is down, and retrying will not help.
NOT_CONFIGURED = 404


def not_configured(message: str) -> HTTPException:
    """The :data:`NOT_CONFIGURED` answer; ``message`` names the settings that switch it on."""
    return HTTPException(NOT_CONFIGURED, detail=message)


def off_response(what: str, also: str = "") -> dict[int | str, dict[str, str]]:
    """The documented :data:`NOT_CONFIGURED` response for a route that needs ``what``,
    with ``also``, what else a 404 of that route means."""
    description = f"{also}; or " if also else ""
    return {NOT_CONFIGURED: {"description": f"{description}{what} is not configured here"}}


def described(
    answers: Mapping[int, str | tuple[str, type]], *also: Mapping[int | str, dict[str, Any]]
) -> dict[int | str, dict[str, Any]]:
    """A route's documented ``responses``: each status code with what it means
    (or, as a pair, that and the model of its body), then those in ``also``
    (e.g. an :func:`off_response`)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status, answer in answers.items():
        description, model = answer if isinstance(answer, tuple) else (answer, None)
        documented[status] = {"description": description}
        if model is not None:
            documented[status]["model"] = model
    for more in also:
        documented.update(more)
    return documented
