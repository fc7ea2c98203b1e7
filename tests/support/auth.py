"""API tokens for tests: a known admin token for control planes the tests start,
and tokens of any role issued straight into an app's database."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import SQLAlchemyError

from controlplane.auth.roles import Role
from controlplane.auth.tokens import issue_token

#: the ``bootstrap_token`` of every control plane built with ``cp_settings``
ADMIN_TOKEN = "slmf_test-" + secrets.token_urlsafe(32)
#: headers that carry :data:`ADMIN_TOKEN`
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def issue(app: FastAPI, role: Role | str = Role.ADMIN, *, name: str | None = None,
          expires_in_s: float | None = None, **kwargs: Any) -> str:
    """Issue a token of ``role`` into ``app``'s database and return it."""
    role = Role(role)
    with app.state.context.sessions() as session:
        return issue_token(
            session, name or f"test-{role.value}", role, expires_in_s=expires_in_s, **kwargs
        ).secret


def admin_client(app: FastAPI, **kwargs: Any) -> TestClient:
    """A TestClient for ``app`` whose every request carries a fresh admin token.

    When ``app``'s database cannot be reached no token can be stored; the
    client then carries one that matches nothing, so its requests get as far
    as the token lookup and fail there, as a real client's would.
    """
    client = TestClient(app, **kwargs)
    try:
        token = issue(app, Role.ADMIN)
    except SQLAlchemyError:
        token = "slmf_unstored-" + secrets.token_urlsafe(16)
    client.headers.update(bearer(token))
    return client
