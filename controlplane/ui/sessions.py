"""Console sessions and one-time sign-in codes, held in the control plane's memory.

A session is what an API token is exchanged for at sign-in: a random id in
an ``HttpOnly`` cookie, the id of the token it stands for, a CSRF secret and
two clocks (idle and absolute expiry). The token itself is never kept: each
request reads the token's row again, so revoking or expiring the token ends
its sessions at once.

Sessions live in this process only: a restart signs everyone out, and behind
several replicas a load balancer must keep a browser on one replica
(docs/console.md). Both tables are capped; the oldest entries go first.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: a session ends this long after sign-in, used or not
SESSION_MAX_S = 8 * 3600.0
#: and this long after its last request
SESSION_IDLE_S = 30 * 60.0
#: sessions (and, separately, codes) held at most; the oldest are dropped
MAX_ENTRIES = 10_000
#: a sign-in code is good for this long unless asked otherwise, and never longer than a day
CODE_TTL_S = 600.0
CODE_MAX_TTL_S = 86_400.0
#: readable and typeable: no 0/O or 1/I/L
_CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_CHARS = 12


@dataclass
class ConsoleSession:
    """One signed-in browser."""

    id: str
    token_id: str
    csrf: str
    created_at: float
    expires_at: float
    idle_until: float

    def check_csrf(self, sent: str | None) -> bool:
        """Whether ``sent`` is this session's CSRF token (constant-time)."""
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), str(sent).encode())


@dataclass(frozen=True)
class SignInCode:
    """A one-time code that signs in as ``token_id`` until ``expires_at``."""

    token_id: str
    expires_at: float


def new_code() -> str:
    """A fresh code, ``XXXX-XXXX-XXXX``."""
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(CODE_CHARS))
    return "-".join(raw[i:i + 4] for i in range(0, CODE_CHARS, 4))


def normalise_code(text: str) -> str:
    """What a person typed, as :func:`new_code` writes it (case and dashes forgiven)."""
    raw = "".join(ch for ch in text.upper() if ch.isalnum())[:CODE_CHARS]
    return "-".join(raw[i:i + 4] for i in range(0, len(raw), 4))


class SessionStore:
    """Thread-safe sessions and sign-in codes; ``now`` is for tests."""

    def __init__(self, now: Callable[[], float] = time.time, *, max_s: float = SESSION_MAX_S,
                 idle_s: float = SESSION_IDLE_S) -> None:
        self._now = now
        self.max_s = max_s
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()
        self._codes: OrderedDict[str, SignInCode] = OrderedDict()

    def open(self, token_id: str, token_expires_at: float | None) -> ConsoleSession:
        """A new session for ``token_id``; it never outlives the token."""
        now = self._now()
        expires = now + self.max_s
        if token_expires_at is not None:
            expires = min(expires, token_expires_at)
        session = ConsoleSession(
            id=secrets.token_urlsafe(32), token_id=token_id, csrf=secrets.token_urlsafe(32),
            created_at=now, expires_at=expires, idle_until=min(expires, now + self.idle_s),
        )
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > MAX_ENTRIES:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        """The live session ``session_id`` names, its idle clock restarted; None if over."""
        if not session_id:
            return None
        now = self._now()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now >= session.idle_until or now >= session.expires_at:
                del self._sessions[session_id]
                return None
            session.idle_until = min(session.expires_at, now + self.idle_s)
            return session

    def close(self, session_id: str | None) -> None:
        """End a session (sign-out); nothing if there is none."""
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def issue_code(self, token_id: str, ttl_s: float = CODE_TTL_S) -> tuple[str, float]:
        """A one-time code for ``token_id`` and when it expires."""
        if not 0 < ttl_s <= CODE_MAX_TTL_S:
            raise ValueError(f"a sign-in code lives between 0 and {CODE_MAX_TTL_S:g} s")
        code = new_code()
        expires = self._now() + ttl_s
        with self._lock:
            self._codes[code] = SignInCode(token_id, expires)
            while len(self._codes) > MAX_ENTRIES:
                self._codes.popitem(last=False)
        return code, expires

    def redeem_code(self, code: str) -> str | None:
        """The token id of ``code``, which can never be used again; None if unknown or expired."""
        with self._lock:
            found = self._codes.pop(normalise_code(code), None)
        if found is None or self._now() >= found.expires_at:
            return None
        return found.token_id
