"""The web console under ``/ui``: server-rendered pages over the same data, roles and
audit log as the API (docs/console.md).

:func:`install` adds the console's routes to the API app and returns the
:class:`~controlplane.ui.security.CookieAuth` the auth middleware takes, so a
session cookie is judged by the same route policy as a bearer token.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from controlplane.context import AppContext

from .render import error_page
from .security import CookieAuth, FormRefused, SecurityHeaders
from .sessions import SessionStore
from .views import admin, device, fleet, releases, rollouts, signin, static

__all__ = ["CookieAuth", "SecurityHeaders", "install"]


async def _refused(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, FormRefused)
    return error_page(request, exc.status, "Refused", exc.code, str(exc))


def install(app: FastAPI, context: AppContext) -> CookieAuth:
    """Add the console to ``app``; the browser half of the auth middleware."""
    store = SessionStore()
    app.state.console_sessions = store
    for part in (static, signin, fleet, device, releases, rollouts, admin):
        app.include_router(part.router)
    app.add_exception_handler(FormRefused, _refused)
    return CookieAuth(store, context.sessions)
