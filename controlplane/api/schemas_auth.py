"""Request and response bodies of the token, audit and identity routes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from controlplane.auth.roles import Role

from .schemas_base import FromRow

#: the longest a token may live (5 years): long-lived tokens should be rare and visible
MAX_TOKEN_TTL_S = 5 * 365 * 86_400
#: default lifetime of a new token (90 days)
DEFAULT_TOKEN_TTL_S = 90 * 86_400


class TokenCreate(BaseModel):
    """A token to issue."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="who or what holds it, e.g. `ci-publisher`")
    role: Role
    expires_in_s: int | None = Field(
        default=DEFAULT_TOKEN_TTL_S, ge=60, le=MAX_TOKEN_TTL_S,
        description="lifetime in seconds; null: never expires",
    )


class TokenOut(FromRow):
    """A token as listed: never the token itself."""

    id: str
    name: str
    role: Role
    created_at: float = Field(description="Unix seconds")
    expires_at: float | None = Field(description="Unix seconds; null: never")
    revoked_at: float | None
    last_used_at: float | None = Field(description="to the minute")
    created_by: str | None = Field(description="id of the token that issued this one")


class TokenIssued(TokenOut):
    """A new token; ``token`` is shown this once and cannot be read back."""

    token: str


class TokenPage(BaseModel):
    """One page of tokens, ordered by id."""

    items: list[TokenOut]
    next: str | None


class AuditOut(FromRow):
    """One audited request."""

    id: int
    ts: float
    token_id: str | None = Field(description="null: the request had no valid token")
    token_name: str | None
    role: Role | None
    method: str
    path: str
    route: str | None
    status: int
    client: str | None


class AuditPage(BaseModel):
    """One page of the audit log, newest first."""

    items: list[AuditOut]
    next: str | None


class WhoAmI(BaseModel):
    """The token a request was made with."""

    id: str
    name: str
    role: Role


class CredentialOut(BaseModel):
    """A device's MQTT credentials record (never the password)."""

    device_id: str
    username: str = Field(description="the MQTT username: the device id")
    created_at: float
    revoked_at: float | None
    broker_reloaded: bool = Field(
        description="the broker was told to re-read its files; false: it applies at its next start"
    )


class EnrollmentOut(CredentialOut):
    """New credentials: ``password`` is shown this once; put it in the agent's config."""

    password: str
    broker_url: str
