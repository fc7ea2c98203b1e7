"""``/v1/audit``: the log of mutating requests, newest first (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controlplane.api.deps import SessionDep
from controlplane.api.pagination import PageDep
from controlplane.api.schemas_auth import AuditOut, AuditPage
from controlplane.auth.audit import list_entries

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage)
def get_audit(
    session: SessionDep,
    page: PageDep,
    token_id: Annotated[str | None, Query(description="only requests made with this token")] = None,
    since: Annotated[float | None, Query(description="only from this Unix time on")] = None,
) -> AuditPage:
    """Every mutating request (POST, PUT, PATCH, DELETE), refused ones included."""
    before = page.after(_entry_id)
    rows = list_entries(session, before=before, token_id=token_id, since=since, limit=page.fetch)
    served, after = page.cut(rows, lambda r: str(r.id))
    return AuditPage(items=[AuditOut.model_validate(r) for r in served], next=after)


def _entry_id(raw: str) -> int:
    # Only digits: int() would also take " 7", "+7" and "7_0".
    if not raw.isdigit():
        raise ValueError(f"not an audit entry id: {raw!r}")
    return int(raw)
