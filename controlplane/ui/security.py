"""How a browser gets in and what it is allowed to send.

* :class:`CookieAuth` plugs the session cookie into the API's
  :class:`~controlplane.auth.middleware.AuthMiddleware`, so every console page
  and form is judged by the same route policy, and audited the same way, as
  the API (``controlplane/auth/policy.py`` lists the console's routes).
* :func:`read_form` is the one way a console handler reads a form: the body
  is capped, the request must come from this origin, and the form must carry
  the session's CSRF token.
* :class:`SecurityHeaders` puts a Content-Security-Policy without inline
  script on every console response: whatever a device reports is escaped by
  the templates, and even a mistake there cannot run a script.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, quote

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.auth.roles import Role
from controlplane.auth.tokens import LAST_USED_RESOLUTION_S, Principal, get_token, is_active

from .sessions import ConsoleSession, SessionStore

PREFIX = "/ui"
SESSION_COOKIE = "slmf_console"
#: the sign-in form's CSRF token, before there is a session to hold one
PRE_COOKIE = "slmf_signin"
#: where the middleware leaves the session for the handlers (``request.state``)
SESSION_KEY = "console_session"
#: a console form is a few fields; anything bigger is not one of ours
MAX_FORM_BYTES = 16 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    # "same-origin", not "no-referrer": with no referrer at all a browser sends
    # `Origin: null` on its own form posts, which the origin check must refuse.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class FormRefused(Exception):
    """A console form was refused; ``status`` and ``code`` say how, the message why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def cookies(scope: Scope) -> dict[str, str]:
    """The request's cookies by name."""
    jar: SimpleCookie = SimpleCookie()
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except Exception:
                return {}
    return {key: morsel.value for key, morsel in jar.items()}


def is_console(scope: Scope) -> bool:
    """Whether the request is for the console."""
    path: str = scope.get("path", "")
    return path == PREFIX or path.startswith(PREFIX + "/")


@dataclass
class CookieAuth:
    """The console's :class:`~controlplane.auth.middleware.BrowserAuth`."""

    store: SessionStore
    sessions: sessionmaker[Session]

    def principal(self, scope: Scope) -> Principal | None:
        """The token behind the session cookie, read again so a revoked token is out at once."""
        if not is_console(scope):
            return None
        found = self.store.get(cookies(scope).get(SESSION_COOKIE))
        if found is None:
            return None
        now = time.time()
        with self.sessions() as session:
            row = get_token(session, found.token_id)
            if row is None or not is_active(row, now):
                self.store.close(found.id)
                return None
            principal = Principal(
                token_id=row.id, name=row.name, role=Role(row.role),
                stale=row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION_S,
            )
        scope.setdefault("state", {})[SESSION_KEY] = found
        return principal

    async def refuse(self, scope: Scope, send: Send, status: int, detail: str) -> bool:
        """A page read without a session goes to the sign-in form; other refusals are HTML."""
        if not is_console(scope):
            return False
        if status == 401 and scope["method"] in ("GET", "HEAD"):
            target = scope["path"]
            await _send(send, 303, b"", [(b"location", f"{PREFIX}/sign-in?next={quote(target)}"
                                          .encode())])
            return True
        title = "Sign in first" if status == 401 else "Not allowed"
        body = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title} - "
                f"slmfleet</title><link rel=stylesheet href={PREFIX}/static/console.css></head>"
                f"<body><main><h1>{title}</h1><p class=error>{html.escape(detail)}</p>"
                f"<p><a href={PREFIX}/>Back to the console</a></p></main></body></html>")
        await _send(send, status, body.encode(), [(b"content-type", b"text/html; charset=utf-8")])
        return True


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Adds the CSP and its companions to every console response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console(scope):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def console_session(request: Request) -> ConsoleSession | None:
    """The session the request came with (None on the sign-in pages)."""
    return getattr(request.state, SESSION_KEY, None)


def check_origin(request: Request) -> None:
    """Refuse a form sent from another site (``Sec-Fetch-Site``, then ``Origin``)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise FormRefused(403, "cross_site", f"a form sent from another site ({site}) is refused")
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.url.netloc}"
    if origin is not None and origin != own:
        raise FormRefused(403, "cross_site", f"a form sent from {origin} is refused here")


async def read_body(request: Request) -> dict[str, str]:
    """The url-encoded form, at most :data:`MAX_FORM_BYTES` (a repeated field: its last value)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise FormRefused(400, "not_a_form", "send the form as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormRefused(413, "too_large", f"a console form is at most {MAX_FORM_BYTES} bytes")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormRefused(400, "bad_form", f"the form could not be read: {exc}") from exc


async def read_form(request: Request) -> dict[str, str]:
    """A signed-in session's form: same origin, capped, and carrying its CSRF token."""
    check_origin(request)
    form = await read_body(request)
    session = console_session(request)
    if session is None or not session.check_csrf(form.get("csrf")):
        raise FormRefused(403, "csrf", "the form's CSRF token is missing or stale: reload the "
                                       "page and send it again")
    return form


def csrf_of(request: Request) -> str:
    """The token a page's forms carry."""
    session = console_session(request)
    return session.csrf if session else ""
