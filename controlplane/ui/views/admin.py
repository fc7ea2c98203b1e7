"""Admin pages: the audit log and API tokens (issue, list, revoke)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from controlplane.api.schemas_auth import TokenCreate
from controlplane.auth.audit import list_entries
from controlplane.auth.tokens import (
    LastAdminToken,
    get_token,
    issue_token,
    list_tokens,
    revoke_token,
)

from ..render import error_page, principal_of, render
from ..security import FormRefused, read_form
from .common import Context, DbSession, page_size

router = APIRouter(prefix="/ui", include_in_schema=False)

TOKENS_SHOWN = 500


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: DbSession) -> HTMLResponse:
    """Mutating requests, API and console alike, newest first."""
    limit = page_size(request.query_params.get("limit"))
    raw = request.query_params.get("before")
    try:
        before = int(raw) if raw else None
    except ValueError:
        return error_page(request, 400, "Bad page", "bad_cursor", "before must be an entry number")
    rows = list_entries(session, before=before, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return render(request, "audit.html", title="Audit log", entries=rows,
                  before=rows[-1].id if more else None, limit=limit)


@router.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, session: DbSession) -> HTMLResponse:
    """Every token, its role and state; the form that issues one."""
    return render(request, "tokens.html", title="Tokens", now=time.time(),
                  tokens=list_tokens(session, after=None, limit=TOKENS_SHOWN), issued=None)


@router.post("/tokens", response_class=HTMLResponse)
async def issue(request: Request, context: Context) -> HTMLResponse:
    """Issue a token and show it this once."""
    form = await read_form(request)
    days = form.get("expires_days", "").strip()
    try:
        body = TokenCreate(name=form.get("name", ""), role=form.get("role", ""),
                           expires_in_s=int(float(days) * 86400) if days else None)
    except (ValidationError, ValueError) as exc:
        raise FormRefused(400, "bad_token", f"name, role (viewer, operator, admin) and a "
                                            f"lifetime of at least a minute: {exc}") from exc
    who = principal_of(request)
    with context.sessions() as session:
        issued = issue_token(session, body.name, body.role, expires_in_s=body.expires_in_s,
                             created_by=who.token_id if who else None)
        rows = list_tokens(session, after=None, limit=TOKENS_SHOWN)
    return render(request, "tokens.html", status=201, title="Tokens", now=time.time(),
                  tokens=rows, issued=issued)


@router.get("/tokens/{token_id}/revoke", response_class=HTMLResponse)
def confirm_revoke(token_id: str, request: Request, session: DbSession) -> HTMLResponse:
    """Ask before revoking: names the token and its role."""
    row = get_token(session, token_id)
    if row is None:
        return error_page(request, 404, "No such token", "unknown_token", f"no token {token_id!r}")
    return render(request, "confirm.html", title=f"Revoke token {row.name}",
                  action=request.url.path,
                  question=f"Revoke token {row.name!r} ({row.role}, id {row.id})?",
                  detail="Every request and console session using it is refused from now on.",
                  fields={}, button=f"Revoke {row.name}", danger=True, back="/ui/tokens")


@router.post("/tokens/{token_id}/revoke", response_class=HTMLResponse)
async def revoke(token_id: str, request: Request, context: Context) -> RedirectResponse:
    """Revoke the token, as ``DELETE /v1/tokens/{id}`` does."""
    await read_form(request)
    with context.sessions() as session:
        try:
            row = revoke_token(session, token_id)
        except LastAdminToken as exc:
            raise FormRefused(409, "last_admin", str(exc)) from exc
    if row is None:
        raise FormRefused(404, "unknown_token", f"no token {token_id!r}")
    return RedirectResponse("/ui/tokens", status_code=303)
