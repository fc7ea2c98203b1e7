"""Describe the route policy in the OpenAPI document: bearer scheme, role per operation,
and the answers an operation can get before its route runs (400, 401, 403, 404)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from controlplane.attributes import same_named

from .policy import required_role

SCHEME = "bearerToken"
_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")
_401 = {"description": "no token, or an unknown, expired or revoked one"}
_403 = {"description": "the token's role is below the one this operation needs"}
#: answered before a route runs: FastAPI for an unparsable body, the HTTP
#: server for malformed framing headers (a non-numeric Content-Length)
_400 = {"description": "the request could not be parsed (malformed body or headers)"}
#: the router matches no route when a path parameter holds a newline
_404 = {"description": "not found (or a path parameter no route can match)"}
#: ... and a path no route matches needs a token, even under an open route's prefix
_401_UNMATCHED = {"description": "a path parameter no route can match (a newline), sent "
                  "without a valid token: unknown paths need one"}


def annotate(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the bearer scheme, each operation's ``security``, ``x-required-role`` and
    its 401/403 responses to ``schema`` (in place); returns it."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token from `slmfleet tokens create` (roles: viewer, "
        "operator, admin)",
    }
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if method in ("post", "put", "patch"):
                responses.setdefault("400", _400)
            if "{" in path:
                responses.setdefault("404", _404)
            role = required_role(method.upper(), path)
            if role is None:
                operation["security"] = []
                if "{" in path:
                    responses.setdefault("401", _401_UNMATCHED)
                continue
            operation["security"] = [{SCHEME: []}]
            operation["x-required-role"] = role.value
            responses.setdefault("401", _401)
            if role.value != "viewer":
                responses.setdefault("403", _403)
    return schema


def install(app: FastAPI, *edits: Callable[[dict[str, Any]], None]) -> None:
    """Make ``app.openapi()`` return the annotated document (built once, cached),
    after ``edits`` (each changes the document in place) have run on it."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = annotate(
                get_openapi(
                    **same_named(app, "title", "version", "summary", "description", "routes")
                )
            )
            for edit in edits:
                edit(app.openapi_schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
