"""``405 Method Not Allowed`` with an ``Allow`` header that lists every method of the path.

Starlette answers a 405 from the first route whose path matches, so its
``Allow`` names that route's methods only (``POST`` for ``/v1/tokens``,
which also takes ``GET``). RFC 9110 section 15.5.6 asks for all of them.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.responses import Response

from controlplane.auth.route_index import RouteIndex


def install(app: FastAPI) -> None:
    """Answer ``app``'s 405s with the full ``Allow`` header; other errors as before."""
    routes = RouteIndex()

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            methods = routes.methods(request.scope)
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))}
        return await http_exception_handler(request, exc)

    app.add_exception_handler(HTTPException, handle)
