"""The audit log: one row per mutating API request, newest read first."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .tables import AUDIT_PATH_LEN, AuditEntry
from .tokens import Principal


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What the middleware knows about a finished mutating request."""

    method: str
    path: str
    route: str | None
    status: int
    principal: Principal | None
    client: str | None
    ts: float


def record(session: Session, rec: AuditRecord) -> None:
    """Append ``rec`` to the log (commits)."""
    who = rec.principal
    session.add(
        AuditEntry(
            ts=rec.ts,
            token_id=who.token_id if who else None,
            token_name=who.name if who else None,
            role=who.role.value if who else None,
            method=rec.method,
            path=rec.path[:AUDIT_PATH_LEN],
            route=rec.route,
            status=rec.status,
            client=rec.client,
        )
    )
    session.commit()


def list_entries(
    session: Session,
    *,
    before: int | None = None,
    token_id: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Entries newest first, optionally by one token or from ``since`` on."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    if token_id is not None:
        query = query.where(AuditEntry.token_id == token_id)
    if since is not None:
        query = query.where(AuditEntry.ts >= since)
    return list(session.scalars(query))
