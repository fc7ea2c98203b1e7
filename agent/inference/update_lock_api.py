"""The local API's update-lock routes: apps on the device hold off model swaps.

==========================================  =========================================
``POST /v1/update-lock``                    ``{"reason": str, "lease_s": number}`` ->
                                            the lock: ``id``, ``reason``, ``taken_at``,
                                            ``expires_at``, ``lease_s``
``POST /v1/update-lock/{id}/renew``         ``{"lease_s": number}`` (optional; default:
                                            the last lease) -> the lock, extended
``DELETE /v1/update-lock/{id}``             -> ``{"released": id}``
``GET /v1/update-lock``                     -> ``{"locks": [...]}``, ids left out (an id
                                            is its holder's to renew and release)
==========================================  =========================================

Bad input is a 400 with a ``code`` (``invalid_json``, ``unknown_field``,
``invalid_reason``, ``invalid_lease``); an unknown or expired id is a 404
``lock_not_found``; more than the cap of locks a 429 ``too_many_locks``.
The rules live in :mod:`agent.update.locks`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ..update.locks import LockError, UpdateLocks
from .schemas import ApiError, parse_json

if TYPE_CHECKING:
    from .api import LocalApi, Send

#: the path of the request being answered (set by the API for each request)
REQUEST_PATH: ContextVar[str] = ContextVar("request_path", default="")
PREFIX = "/v1/update-lock"


def _locks(api: LocalApi) -> UpdateLocks:
    if api.locks is None:
        raise ApiError(503, "update locks are not available on this agent",
                       code="locks_unavailable")
    return api.locks


def _fields(body: bytes, allowed: set[str], *, required: bool = True) -> dict[str, Any]:
    if not body.strip() and not required:
        return {}
    data = parse_json(body)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)[:200]}; "
                       f"allowed: {', '.join(sorted(allowed))}", code="unknown_field")
    return data


def _lock_id() -> tuple[str, str]:
    """``(id, rest)`` of ``/v1/update-lock/{id}[/rest]``."""
    tail = REQUEST_PATH.get()[len(PREFIX) + 1:]
    lock_id, _, rest = tail.partition("/")
    return lock_id, rest


async def _answer(api: LocalApi, send: Send, call: Any) -> None:
    try:
        payload = call()
    except LockError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from exc
    await api._json(send, 200, payload)


async def take(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /v1/update-lock``."""
    locks = _locks(api)
    data = _fields(body, {"reason", "lease_s"})
    await _answer(api, send, lambda: locks.take(data.get("reason"), data.get("lease_s")).public())


async def listing(api: LocalApi, send: Send, body: bytes) -> None:
    """``GET /v1/update-lock``."""
    held = _locks(api).held()
    await api._json(send, 200, {"locks": [
        {k: v for k, v in lock.public().items() if k != "id"} for lock in held]})


async def renew(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /v1/update-lock/{id}/renew``."""
    locks = _locks(api)
    lock_id, rest = _lock_id()
    if rest != "renew":
        raise ApiError(404, f"no route {REQUEST_PATH.get()[:200]}", code="not_found")
    data = _fields(body, {"lease_s"}, required=False)
    await _answer(api, send, lambda: locks.renew(lock_id, data.get("lease_s")).public())


async def release(api: LocalApi, send: Send, body: bytes) -> None:
    """``DELETE /v1/update-lock/{id}``."""
    locks = _locks(api)
    lock_id, rest = _lock_id()
    if rest:
        raise ApiError(404, f"no route {REQUEST_PATH.get()[:200]}", code="not_found")
    await _answer(api, send, lambda: {"released": locks.release(lock_id).id})


#: path -> {method: handler}
ROUTES: dict[str, dict[str, Any]] = {
    PREFIX: {"GET": listing, "POST": take},
    f"{PREFIX}/*": {"POST": renew, "DELETE": release},
}
