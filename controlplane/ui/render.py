"""Templates and the helpers they use.

Autoescaping is on for every template, whatever its name: hostnames,
labels, model strings and event reasons come from devices and are
untrusted text. Nothing in a template marks device text ``safe``; the SVG
charts (:mod:`controlplane.ui.charts`) escape what they embed themselves.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from controlplane.auth.middleware import PRINCIPAL_KEY
from controlplane.auth.roles import Role
from controlplane.auth.tokens import Principal

from .security import csrf_of

TEMPLATES = Path(__file__).parent / "templates"


def when(ts: float | None) -> str:
    """A Unix time as ``2026-12-06 11:02:03Z``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago ``ts`` was, roughly (``12 s``, ``3 min``, ``5 h``, ``2 d``)."""
    if ts is None:
        return "never"
    delta = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{delta / size:.0f} {unit} ago"
    return f"{delta:.0f} s ago"


def size(n: float | None) -> str:
    """Bytes in binary units (``93.2 MiB``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def figure(value: float | None, digits: int = 3) -> str:
    """A measured value to ``digits`` significant digits, ``n/a`` for none."""
    return "n/a" if value is None else f"{value:.{digits}g}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, ago=ago, size=size, figure=figure)
    return env


ENV = _environment()


def principal_of(request: Request) -> Principal | None:
    """Who is signed in (set by the auth middleware)."""
    return getattr(request.state, PRINCIPAL_KEY, None)


def can(request: Request, role: Role) -> bool:
    """Whether the signed-in token has at least ``role`` (controls are shown only then)."""
    who = principal_of(request)
    return who is not None and who.role.allows(role)


def render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """``template`` filled with ``values`` and what every page needs (who, CSRF, roles)."""
    who = principal_of(request)
    text = ENV.get_template(template).render(
        who=who,
        csrf=csrf_of(request),
        operator=can(request, Role.OPERATOR),
        admin=can(request, Role.ADMIN),
        path=request.url.path,
        **values,
    )
    # Pages carry fleet data and a CSRF token: never cached, never shared.
    return HTMLResponse(text, status_code=status, headers={"cache-control": "no-store"})


def error_page(request: Request, status: int, title: str, code: str,
               message: str) -> HTMLResponse:
    """A page that says what went wrong, with a code a script can match on."""
    return render(request, "error.html", status=status, title=title, code=code, message=message)


def fragment(template: str, **values: Any) -> str:
    """A template rendered on its own (live updates)."""
    return ENV.get_template(template).render(**values)
