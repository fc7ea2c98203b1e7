"""Sign-in (an API token or a one-time code for a session cookie), sign-out, and codes.

The token is typed into a form, never put in a URL: URLs end up in logs and
browser history. ``slmfleet dev`` prints a one-time code instead
(``POST /ui/sign-in-codes`` with a bearer token makes one), which signs in
as the token that asked for it and is gone once used.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from controlplane.auth.middleware import bearer_token
from controlplane.auth.tokens import MAX_TOKEN_LEN, TOKEN_PREFIX, authenticate, get_token

from ..render import principal_of, render
from ..security import (
    PRE_COOKIE,
    SESSION_COOKIE,
    FormRefused,
    check_origin,
    console_session,
    cookies,
    read_body,
    read_form,
)
from ..sessions import CODE_MAX_TTL_S, CODE_TTL_S, SessionStore
from .common import Context

router = APIRouter(prefix="/ui", include_in_schema=False)


def store_of(request: Request) -> SessionStore:
    """The process's console sessions."""
    return request.app.state.console_sessions


def safe_next(raw: str | None) -> str:
    """Where to go after sign-in: a console path only (no open redirect)."""
    if raw and raw.startswith("/ui/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/ui/"


def _sign_in_form(request: Request, status: int = 200, error: str | None = None,
                  next_url: str = "/ui/") -> HTMLResponse:
    pre = secrets.token_urlsafe(24)
    response = render(request, "sign_in.html", status=status, title="Sign in", pre=pre,
                      error=error, next_url=next_url)
    response.set_cookie(PRE_COOKIE, pre, max_age=3600, path="/ui/sign-in", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_page(request: Request) -> HTMLResponse:
    """The form: paste an API token, or type the code `slmfleet dev` printed."""
    return _sign_in_form(request, next_url=safe_next(request.query_params.get("next")))


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request, context: Context) -> Response:
    """Exchange a token or a one-time code for a session cookie."""
    check_origin(request)
    form = await read_body(request)
    pre = cookies(request.scope).get(PRE_COOKIE, "")
    sent = form.get("csrf", "")
    if not pre or not hmac.compare_digest(pre.encode(), sent.encode()):
        raise FormRefused(403, "csrf", "the sign-in form is stale or came from elsewhere: "
                                       "open the sign-in page again")
    credential = form.get("credential", "").strip()[:MAX_TOKEN_LEN]
    next_url = safe_next(form.get("next"))
    store = store_of(request)

    def check() -> tuple[str, float | None] | None:
        with context.sessions() as session:
            if credential.startswith(TOKEN_PREFIX):
                who = authenticate(session, credential)
                token_id = who.token_id if who else None
            else:
                token_id = store.redeem_code(credential) if credential else None
            row = get_token(session, token_id) if token_id else None
            if row is None or row.revoked_at is not None or (
                    row.expires_at is not None and row.expires_at <= time.time()):
                return None
            return row.id, row.expires_at

    found = await to_thread.run_sync(check)
    if found is None:
        return _sign_in_form(request, 401, "That token or code is unknown, used, expired or "
                                           "revoked.", next_url)
    session = store.open(*found)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(SESSION_COOKIE, session.id, path="/ui", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https",
                        max_age=int(session.expires_at - time.time()))
    response.delete_cookie(PRE_COOKIE, path="/ui/sign-in", httponly=True, samesite="strict")
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> RedirectResponse:
    """End the session here and in the browser."""
    await read_form(request)
    session = console_session(request)
    store_of(request).close(session.id if session else None)
    response = RedirectResponse("/ui/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


class CodeRequest(BaseModel):
    """How long the code may wait to be used."""

    ttl_s: float = Field(CODE_TTL_S, gt=0, le=CODE_MAX_TTL_S)


@router.post("/sign-in-codes")
def sign_in_code(request: Request,
                 body: Annotated[CodeRequest | None, Body()] = None) -> JSONResponse:
    """A one-time code that signs a browser in as the calling token (bearer only)."""
    who = principal_of(request)
    if who is None or bearer_token(request.scope) is None:
        # A console session could be tricked into minting codes for someone else;
        # only a program holding the token itself may ask.
        raise HTTPException(403, detail={"code": "bearer_only",
                                         "message": "ask with `Authorization: Bearer <token>`"})
    code, expires = store_of(request).issue_code(who.token_id, (body or CodeRequest()).ttl_s)
    return JSONResponse({"code": code, "expires_at": expires, "sign_in": "/ui/sign-in"},
                        status_code=201)
