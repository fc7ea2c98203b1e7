"""Issue, check, list and revoke bearer tokens; only their sha256 is stored.

A token is ``slmf_`` followed by 43 URL-safe characters (256 random bits).
It is returned once, when issued; afterwards only its id, name and role can
be read back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .roles import Role
from .tables import ApiToken

TOKEN_PREFIX = "slmf_"
#: a token longer than this is not one of ours; refuse before hashing it
MAX_TOKEN_LEN = 256
#: ``last_used_at`` is refreshed at most this often
LAST_USED_RESOLUTION_S = 60.0


class TokenError(ValueError):
    """A token operation was refused; the message says why."""


class LastAdminToken(TokenError):
    """Revoking this token would leave no active admin token."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: one valid token."""

    token_id: str
    name: str
    role: Role
    #: its ``last_used_at`` is older than :data:`LAST_USED_RESOLUTION_S`
    stale: bool = False


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly issued token: ``secret`` is the only copy there will ever be."""

    row: ApiToken
    secret: str


def new_secret() -> str:
    """A fresh token string."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """The stored form of ``token``: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_active(row: ApiToken, now: float) -> bool:
    """Neither revoked nor expired at ``now``."""
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


def issue_token(
    session: Session,
    name: str,
    role: Role,
    *,
    expires_in_s: float | None,
    created_by: str | None = None,
    secret: str | None = None,
    now: float | None = None,
) -> IssuedToken:
    """Store a new token's hash and return it with the secret (commits).

    ``secret`` is for a token chosen outside (the configured bootstrap token);
    by default a random one is drawn.
    """
    now = time.time() if now is None else now
    secret = secret or new_secret()
    if len(secret) > MAX_TOKEN_LEN:
        raise TokenError(f"a token is at most {MAX_TOKEN_LEN} characters")
    row = ApiToken(
        id=secrets.token_hex(8),
        name=name,
        role=role.value,
        token_sha256=digest(secret),
        created_at=now,
        expires_at=now + expires_in_s if expires_in_s is not None else None,
        revoked_at=None,
        last_used_at=None,
        created_by=created_by,
    )
    session.add(row)
    session.commit()
    return IssuedToken(row, secret)


def authenticate(session: Session, token: str, now: float | None = None) -> Principal | None:
    """The principal ``token`` stands for, or None (unknown, revoked or expired).

    Reads only: a request never waits on the database's write lock to be let in.
    ``last_used_at`` is written separately (:func:`touch`).
    """
    if not token or len(token) > MAX_TOKEN_LEN:
        return None
    now = time.time() if now is None else now
    wanted = digest(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == wanted))
    # The index lookup already matched; the constant-time compare keeps the
    # decision itself free of early exits on attacker-chosen input.
    if row is None or not hmac.compare_digest(row.token_sha256, wanted):
        return None
    if not is_active(row, now):
        return None
    stale = row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION_S
    return Principal(token_id=row.id, name=row.name, role=Role(row.role), stale=stale)


def touch(session: Session, token_id: str, now: float | None = None) -> None:
    """Record that ``token_id`` was just used (commits)."""
    now = time.time() if now is None else now
    session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now))
    session.commit()


def list_tokens(
    session: Session, *, after: str | None = None, limit: int = 100
) -> list[ApiToken]:
    """Tokens ordered by id, revoked and expired ones included."""
    query = select(ApiToken).order_by(ApiToken.id).limit(limit)
    if after is not None:
        query = query.where(ApiToken.id > after)
    return list(session.scalars(query))


def list_named(session: Session, name: str) -> list[ApiToken]:
    """Tokens called ``name``."""
    return list(session.scalars(select(ApiToken).where(ApiToken.name == name)))


def get_token(session: Session, token_id: str) -> ApiToken | None:
    """One token row by id."""
    return session.get(ApiToken, token_id)


def count_tokens(session: Session) -> int:
    """How many tokens were ever issued."""
    return session.scalar(select(func.count()).select_from(ApiToken)) or 0


def active_admins(session: Session, now: float) -> list[str]:
    """Ids of admin tokens that still work."""
    rows = session.scalars(
        select(ApiToken).where(ApiToken.role == Role.ADMIN.value, ApiToken.revoked_at.is_(None))
    )
    return [r.id for r in rows if is_active(r, now)]


def revoke_token(session: Session, token_id: str, now: float | None = None) -> ApiToken | None:
    """Revoke a token (commits); None if there is no such token.

    Revoking an already revoked token changes nothing. The last active admin
    token cannot be revoked: nobody could issue a new one through the API.
    """
    now = time.time() if now is None else now
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return row
    if row.role == Role.ADMIN.value and active_admins(session, now) == [row.id]:
        raise LastAdminToken(
            "this is the last active admin token: issue another admin token first"
        )
    row.revoked_at = now
    session.commit()
    return row
