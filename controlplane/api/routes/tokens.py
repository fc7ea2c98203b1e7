"""``/v1/tokens``: issue, list and revoke API tokens (admin only, see auth.policy)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from controlplane.api.deps import ContextDep, PrincipalDep, SessionDep
from controlplane.api.pagination import decode_cursor, encode_cursor, page_size
from controlplane.api.schemas_auth import TokenCreate, TokenIssued, TokenOut, TokenPage
from controlplane.auth.tokens import LastAdminToken, issue_token, list_tokens, revoke_token

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", response_model=TokenIssued, status_code=201)
def create_token(body: TokenCreate, session: SessionDep, principal: PrincipalDep) -> TokenIssued:
    """Issue a token; the response is the only time the token itself is shown."""
    issued = issue_token(
        session, body.name, body.role, expires_in_s=body.expires_in_s,
        created_by=principal.token_id if principal else None,
    )
    return TokenIssued(**TokenOut.model_validate(issued.row).model_dump(), token=issued.secret)


@router.get("", response_model=TokenPage)
def get_tokens(
    session: SessionDep,
    context: ContextDep,
    limit: Annotated[int | None, Query(ge=1, description="page size, at most page_max")] = None,
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
) -> TokenPage:
    """Every token ever issued (revoked and expired too), by id."""
    size = page_size(limit, context.settings.page_max)
    rows = list_tokens(session, after=decode_cursor(cursor) if cursor else None, limit=size + 1)
    page = rows[:size]
    return TokenPage(
        items=[TokenOut.model_validate(r) for r in page],
        next=encode_cursor(page[-1].id) if len(rows) > size else None,
    )


@router.delete(
    "/{token_id}",
    response_model=TokenOut,
    responses={
        404: {"description": "no such token"},
        409: {"description": "the last active admin token cannot be revoked"},
    },
)
def revoke(token_id: str, session: SessionDep) -> TokenOut:
    """Revoke a token: it is refused from the next request on. Revoking twice is harmless."""
    try:
        row = revoke_token(session, token_id)
    except LastAdminToken as exc:
        raise HTTPException(409, detail=str(exc)) from exc
    if row is None:
        raise HTTPException(404, detail=f"token {token_id!r} not found")
    return TokenOut.model_validate(row)
