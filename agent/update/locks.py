"""Update locks: apps on the device hold off model activations while they work.

An app takes a lock with a reason and a lease (``POST /v1/update-lock`` on
the local API, :mod:`agent.inference.update_lock_api`), renews it before the
lease runs out, and releases it when done. While any lock is held the update
pipeline defers activations (``deferred``, code ``locked``, naming the
holders' reasons); downloads and health checks go on. A holder that dies
stops renewing, so its lock expires with its lease and cannot block updates
for ever.

Locks are persisted (one JSON file, replaced atomically: :mod:`agent.atomic`)
so an agent restarted mid-task still honours them for their lease. Leases are
wall-clock times on the pipeline's :class:`~agent.update.clock.Clock`, so a
restart neither shortens nor lengthens them.

Caps: a reason is 1 to :data:`MAX_REASON_CHARS` printable characters, a lease
:data:`MIN_LEASE_S` to :data:`MAX_LEASE_S` seconds, at most :data:`MAX_LOCKS`
locks at once. Refusals are :class:`LockError` with a ``code`` the API
answers with.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomic import ensure_dir, read_json, write_json_atomic
from .clock import Clock

log = logging.getLogger(__name__)

SCHEMA = "slmfleet.update-locks/1"
MAX_REASON_CHARS = 256
MIN_LEASE_S = 1.0
#: a day: a task longer than that renews its lock
MAX_LEASE_S = 86_400.0
MAX_LOCKS = 32


class LockError(Exception):
    """A lock request refused: ``status`` and ``code`` are what the API answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True, slots=True)
class UpdateLock:
    """One held lock."""

    id: str
    reason: str
    #: when it was taken (epoch seconds); an operator's override skips locks taken before it
    taken_at: float
    expires_at: float
    #: the lease asked for; a renewal without one extends by it again
    lease_s: float

    def public(self) -> dict[str, Any]:
        """The lock as the API shows it."""
        return asdict(self)


def check_reason(reason: object) -> str:
    """``reason`` if it is an acceptable lock reason, else :class:`LockError`."""
    if not isinstance(reason, str) or not reason.strip():
        raise LockError(400, "invalid_reason", "reason must be a non-empty string")
    if len(reason) > MAX_REASON_CHARS:
        raise LockError(400, "invalid_reason",
                        f"reason is {len(reason)} characters; at most {MAX_REASON_CHARS}")
    if not reason.isprintable():
        raise LockError(400, "invalid_reason", "reason must be printable text on one line")
    return reason


def check_lease(lease_s: object) -> float:
    """``lease_s`` as seconds if it is an acceptable lease, else :class:`LockError`."""
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float):
        raise LockError(400, "invalid_lease", "lease_s must be a number of seconds")
    if not MIN_LEASE_S <= lease_s <= MAX_LEASE_S:
        raise LockError(400, "invalid_lease",
                        f"lease_s must be from {MIN_LEASE_S:g} to {MAX_LEASE_S:g} seconds")
    return float(lease_s)


class UpdateLocks:
    """The device's update locks, persisted at ``path``; call from the event loop."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path, self._clock = path, clock
        self._locks: dict[str, UpdateLock] = {}
        self._changed: asyncio.Event | None = None
        self._load()

    # -- reading ----------------------------------------------------------------

    def held(self) -> list[UpdateLock]:
        """The locks whose lease has not run out, oldest first."""
        now = self._clock.now()
        return sorted((lock for lock in self._locks.values() if lock.expires_at > now),
                      key=lambda lock: lock.taken_at)

    def changed(self) -> asyncio.Event:
        """An event set at the next take, renewal or release (a new one after each)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    # -- the API's operations ----------------------------------------------------

    def take(self, reason: object, lease_s: object) -> UpdateLock:
        """Take a new lock; raises :class:`LockError` for bad input or too many locks."""
        reason, lease = check_reason(reason), check_lease(lease_s)
        self._prune()
        if len(self._locks) >= MAX_LOCKS:
            raise LockError(429, "too_many_locks",
                            f"{MAX_LOCKS} update locks are held; release one first")
        now = self._clock.now()
        lock = UpdateLock(secrets.token_hex(16), reason, now, now + lease, lease)
        self._locks[lock.id] = lock
        self._save()
        return lock

    def renew(self, lock_id: str, lease_s: object = None) -> UpdateLock:
        """Extend a held lock's lease to ``lease_s`` (None: its last lease) from now."""
        lock = self._get(lock_id)
        lease = lock.lease_s if lease_s is None else check_lease(lease_s)
        lock = UpdateLock(lock.id, lock.reason, lock.taken_at, self._clock.now() + lease, lease)
        self._locks[lock.id] = lock
        self._save()
        return lock

    def release(self, lock_id: str) -> UpdateLock:
        """Release a held lock; activations it deferred may go on at once."""
        lock = self._get(lock_id)
        del self._locks[lock_id]
        self._save()
        return lock

    def _get(self, lock_id: str) -> UpdateLock:
        lock = self._locks.get(lock_id)
        if lock is None or lock.expires_at <= self._clock.now():
            raise LockError(404, "lock_not_found",
                            f"no update lock {lock_id[:64]!r} is held (released or expired)")
        return lock

    # -- persistence ------------------------------------------------------------------

    def _prune(self) -> None:
        now = self._clock.now()
        self._locks = {k: v for k, v in self._locks.items() if v.expires_at > now}

    def _save(self) -> None:
        self._prune()
        ensure_dir(self.path.parent)
        write_json_atomic(self.path, {"schema": SCHEMA,
                                      "locks": [lock.public() for lock in self.held()]})
        if self._changed is not None:
            self._changed.set()
        self._changed = None

    def _load(self) -> None:
        try:
            data = read_json(self.path)
        except (OSError, ValueError) as exc:
            # Refusing to run over it would stop every update for good; the
            # locks it held are lost, which the log says.
            log.error("update locks %s unreadable (%s); starting with none", self.path, exc)
            return
        if data is None:
            return
        try:
            if data["schema"] != SCHEMA:
                raise ValueError(f"schema {data['schema']!r}")
            for item in data["locks"][:MAX_LOCKS]:
                lock = UpdateLock(str(item["id"]), check_reason(item["reason"]),
                                  float(item["taken_at"]), float(item["expires_at"]),
                                  check_lease(item["lease_s"]))
                self._locks[lock.id] = lock
        except (KeyError, TypeError, ValueError, LockError) as exc:
            log.error("update locks %s invalid (%s); starting with none", self.path, exc)
            self._locks = {}
        self._prune()
