"""``/v1/audit``: the log of mutating requests, newest first (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controlplane.api.deps import ContextDep, SessionDep
from controlplane.api.pagination import decode_cursor, encode_cursor, page_size, query_error
from controlplane.api.schemas_auth import AuditOut, AuditPage
from controlplane.auth.audit import list_entries

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage)
def get_audit(
    session: SessionDep,
    context: ContextDep,
    token_id: Annotated[str | None, Query(description="only requests made with this token")] = None,
    since: Annotated[float | None, Query(description="only from this Unix time on")] = None,
    limit: Annotated[int | None, Query(ge=1, description="page size, at most page_max")] = None,
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
) -> AuditPage:
    """Every mutating request (POST, PUT, PATCH, DELETE), refused ones included."""
    size = page_size(limit, context.settings.page_max)
    before = None
    if cursor:
        raw = decode_cursor(cursor)
        if not raw.isdigit():
            raise query_error("cursor", "invalid cursor", cursor)
        before = int(raw)
    rows = list_entries(session, before=before, token_id=token_id, since=since, limit=size + 1)
    page = rows[:size]
    return AuditPage(
        items=[AuditOut.model_validate(r) for r in page],
        next=encode_cursor(str(page[-1].id)) if len(rows) > size else None,
    )
