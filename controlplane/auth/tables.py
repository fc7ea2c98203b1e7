"""Tables of access control: API tokens (only their hashes), the audit log and
per-device MQTT credentials (only the broker's password hashes).

Registered on the registry's :class:`~controlplane.db.models.Base`, so one
metadata (and one Alembic history) covers every table.
"""

from __future__ import annotations

from sqlalchemy import Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.models import DEVICE_ID_LEN, SHORT_LEN, Base, big_id

#: hex sha256
DIGEST_LEN = 64
#: an audited path is cut to this many characters
AUDIT_PATH_LEN = 512


class ApiToken(Base):
    """One bearer token for the admin API. The token itself is never stored.

    ``token_sha256`` is the sha256 of the whole token string; tokens carry 256
    random bits, so a fast hash is enough (nothing to brute-force) and lets a
    request find its row through the unique index in one lookup.
    """

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(SHORT_LEN))
    #: ``viewer``, ``operator`` or ``admin``
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    created_at: Mapped[float]
    #: None: never expires
    expires_at: Mapped[float | None]
    revoked_at: Mapped[float | None]
    #: updated at most once a minute, so reads do not turn into writes
    last_used_at: Mapped[float | None]
    #: id of the token that created this one (None for the bootstrap token)
    created_by: Mapped[str | None] = mapped_column(String(32))


class AuditEntry(Base):
    """One mutating API request: who, what, and how it ended."""

    __tablename__ = "audit_log"

    id: Mapped[int] = big_id()
    ts: Mapped[float] = mapped_column(index=True)
    #: None when the request carried no valid token
    token_id: Mapped[str | None] = mapped_column(String(32), index=True)
    token_name: Mapped[str | None] = mapped_column(String(SHORT_LEN))
    role: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(AUDIT_PATH_LEN))
    #: the route template the path matched (None: no route)
    route: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(SHORT_LEN))


class DeviceCredential(Base):
    """A device's MQTT password, as the mosquitto password-file hash only.

    No foreign key to ``devices``: a device is enrolled before it ever
    connects, so it has no registry row yet.
    """

    __tablename__ = "device_credentials"

    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), primary_key=True)
    #: mosquitto ``$7$`` PBKDF2-SHA512 hash
    password_hash: Mapped[str] = mapped_column(String(SHORT_LEN * 2))
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]
    #: token id of the admin who enrolled the device
    created_by: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (Index("ix_device_credentials_revoked_at", "revoked_at"),)
