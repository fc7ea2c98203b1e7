"""Find the route template a request path belongs to, before the router runs.

Built from the app's routes (FastAPI's ``iter_route_contexts`` where it
exists, which sees through included routers; the flat route list on older
FastAPI) and matched with Starlette's own path compiler, so the template is
the one the router will pick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import fastapi.routing
from starlette.routing import compile_path
from starlette.types import Scope


@dataclass(frozen=True, slots=True)
class _Entry:
    regex: re.Pattern[str]
    template: str
    methods: frozenset[str]


def _entries(app: object) -> list[_Entry]:
    routes = getattr(app, "routes", [])
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    out = []
    for route in iterate(routes) if iterate else routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        regex, template, _ = compile_path(path)
        out.append(_Entry(regex, template, frozenset(getattr(route, "methods", None) or ())))
    return out


class RouteIndex:
    """Route templates of one app, rebuilt when its route list grows."""

    def __init__(self) -> None:
        self._size = -1
        self._entries: list[_Entry] = []

    def _refresh(self, scope: Scope) -> None:
        app = scope.get("app")
        size = len(getattr(app, "routes", ()))
        if size != self._size:
            self._entries, self._size = _entries(app), size

    @staticmethod
    def _path(scope: Scope) -> str:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            # Mounted under a prefix: routes are declared without it.
            path = path[len(root):] or "/"
        return path

    def methods(self, scope: Scope) -> frozenset[str]:
        """Every method some route takes at ``scope``'s path (what ``Allow`` lists)."""
        self._refresh(scope)
        path = self._path(scope)
        found: set[str] = set()
        for entry in self._entries:
            if entry.regex.match(path):
                found |= entry.methods
        return frozenset(found)

    def template(self, scope: Scope) -> str | None:
        """The template (``/v1/devices/{device_id}``) ``scope``'s path matches, preferring
        a route that also takes its method; None when no route has that path."""
        self._refresh(scope)
        path = self._path(scope)
        method = scope.get("method", "GET")
        partial = None
        for entry in self._entries:
            if entry.regex.match(path):
                if not entry.methods or method in entry.methods:
                    return entry.template
                if method == "HEAD" and "GET" in entry.methods:
                    return entry.template
                partial = partial or entry.template
        return partial
