"""The first admin token: without one, nobody could issue any other."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from .roles import Role
from .tokens import IssuedToken, count_tokens, issue_token, list_named, revoke_token

log = logging.getLogger(__name__)

BOOTSTRAP_NAME = "bootstrap"


def bootstrap_admin(
    sessions: sessionmaker[Session], configured: str | None = None
) -> IssuedToken | None:
    """On a database with no tokens at all, create an admin token that never expires.

    With ``configured`` (the ``bootstrap_token`` setting) that string becomes
    the token; otherwise a random one is drawn and logged once, at WARNING, as
    the only place it will ever appear. Returns the token when one was created.
    Later starts find tokens and do nothing, so a revoked bootstrap token
    stays revoked.
    """
    with sessions() as session:
        if count_tokens(session):
            return None
        issued = issue_token(
            session, BOOTSTRAP_NAME, Role.ADMIN, expires_in_s=None, secret=configured
        )
    if configured is None:
        log.warning(
            "first start: created admin token %r (id %s). It is shown this once; store it, "
            "then issue named tokens with `slmfleet tokens create` and revoke this one:\n"
            "TOKEN %s",
            BOOTSTRAP_NAME, issued.row.id, issued.secret,
        )
    else:
        log.info("first start: the configured bootstrap_token is admin token %s", issued.row.id)
    return issued


def rotate_named_token(
    sessions: sessionmaker[Session], name: str, role: Role, expires_in_s: float
) -> str:
    """Issue a token called ``name`` and revoke the earlier live ones of that name.

    ``slmfleet dev`` uses it on every start: the demo prints a fresh admin
    token each run without piling up live ones.
    """
    with sessions() as session:
        issued = issue_token(session, name, role, expires_in_s=expires_in_s)
        for row in list_named(session, name):
            if row.id != issued.row.id and row.revoked_at is None:
                revoke_token(session, row.id)
    return issued.secret
