"""``/v1/tokens``: issue, list and revoke API tokens (admin only, see auth.policy)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from controlplane.api.deps import PrincipalDep, SessionDep, described
from controlplane.api.pagination import PageDep
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
def get_tokens(session: SessionDep, page: PageDep) -> TokenPage:
    """Every token ever issued (revoked and expired too), by id."""
    rows = list_tokens(session, after=page.after(), limit=page.fetch)
    served, after = page.cut(rows, lambda r: r.id)
    return TokenPage(items=[TokenOut.model_validate(r) for r in served], next=after)


@router.delete(
    "/{token_id}",
    response_model=TokenOut,
    responses=described(
        {404: "no such token", 409: "the last active admin token cannot be revoked"}
    ),
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
