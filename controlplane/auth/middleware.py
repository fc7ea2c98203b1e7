"""One ASGI middleware enforces the route policy on every request and audits mutations.

It runs before routing, so it finds the route template itself
(:class:`~controlplane.auth.route_index.RouteIndex`) and asks
:func:`~controlplane.auth.policy.required_role`.
Running first means a request without a valid token is answered 401 before
its body is read or validated, and no route can forget to check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from anyio import CancelScope, to_thread
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .audit import AuditRecord, record
from .policy import is_mutation, required_role
from .route_index import RouteIndex
from .tokens import Principal, authenticate, touch

log = logging.getLogger(__name__)

#: where a route handler finds the caller (``request.state.principal``)
PRINCIPAL_KEY = "principal"


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BrowserAuth(Protocol):
    """A second way in for a browser (the console's session cookie), checked by the
    same route policy and audited the same way as a bearer token."""

    def principal(self, scope: Scope) -> Principal | None:
        """Who a request without a bearer token acts as; blocking (it runs in a thread)."""
        ...

    async def refuse(self, scope: Scope, send: Send, status: int, detail: str) -> bool:
        """Answer a 401 or 403 in the browser's own way; False leaves it to the JSON answer."""
        ...


class AuthMiddleware:
    """Authenticate the bearer token, check its role against the route, audit mutations."""

    def __init__(self, app: ASGIApp, sessions: sessionmaker[Session],
                 browser: BrowserAuth | None = None) -> None:
        self.app = app
        self.sessions = sessions
        self.browser = browser
        self.routes = RouteIndex()
        self._touch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-touch")
        self._touch_lock = threading.Lock()
        self._touch_pending = False

    def _authenticate(self, token: str) -> Principal | None:
        with self.sessions() as session:
            return authenticate(session, token)

    def _touch_later(self, token_id: str) -> None:
        # Off the request path, one at a time, and skipped while one is
        # pending: a read must not wait for the write lock (a backup or a
        # long ingest batch can hold it for seconds).
        with self._touch_lock:
            if self._touch_pending:
                return
            self._touch_pending = True
        self._touch_pool.submit(self._touch, token_id)

    def _touch(self, token_id: str) -> None:
        try:
            with self.sessions() as session:
                touch(session, token_id)
        except SQLAlchemyError as exc:
            log.warning("auth: could not record token use: %s", exc)
        finally:
            with self._touch_lock:
                self._touch_pending = False

    def _audit(self, rec: AuditRecord) -> None:
        try:
            with self.sessions() as session:
                record(session, rec)
        except SQLAlchemyError:
            # The request already happened; losing its audit row is logged
            # loudly rather than turned into an error for a finished call.
            log.exception("audit: could not record %s %s (%s)", rec.method, rec.path, rec.status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        route = self.routes.template(scope)
        needed = required_role(method, route)
        token = bearer_token(scope)
        principal: Principal | None = None
        if token is not None and needed is not None:
            # A database error propagates: the request fails as a server error,
            # like any other query would, and is never let through.
            principal = await to_thread.run_sync(self._authenticate, token)
        elif needed is not None and self.browser is not None:
            principal = await to_thread.run_sync(self.browser.principal, scope)
        if principal is not None and principal.stale:
            self._touch_later(principal.token_id)
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        status_box: dict[str, int] = {}

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            if needed is None:
                await self.app(scope, receive, send_and_watch)
            elif principal is None:
                why = (
                    "no bearer token" if token is None
                    else "the token is unknown, expired or revoked"
                )
                if self.browser is not None and await self.browser.refuse(
                        scope, send_and_watch, 401, why):
                    return
                await _answer(
                    send_and_watch, 401,
                    f"{why}: send `Authorization: Bearer <token>` (`slmfleet login`)",
                    [(b"www-authenticate", b'Bearer realm="slmfleet"')],
                )
            elif not principal.role.allows(needed):
                detail = (f"{method} {route or scope['path']} needs the {needed.value} role; "
                          f"token {principal.name!r} has {principal.role.value}")
                if self.browser is None or not await self.browser.refuse(
                        scope, send_and_watch, 403, detail):
                    await _answer(send_and_watch, 403, detail, [])
            else:
                await self.app(scope, receive, send_and_watch)
        finally:
            if is_mutation(method):
                client = scope.get("client")
                rec = AuditRecord(
                    method=method,
                    path=scope["path"],
                    route=route,
                    status=status_box.get("status", 500),
                    principal=principal,
                    client=f"{client[0]}:{client[1]}" if client else None,
                    ts=time.time(),
                )
                # Shielded: a client that hangs up must not cancel its audit row.
                with CancelScope(shield=True):
                    await to_thread.run_sync(self._audit, rec)
