"""The control-plane API from Python: one client for the admin CLI, ``slmfleet dev``,
the benchmarks and the tests, with one place for the server URL, the bearer
token, timeouts and error messages that name the fix, and the operations
made of several calls (:func:`publish_release`, in :mod:`controlplane.publishing`).

Where the server and token come from, first found wins: the ``--server`` /
``--token`` options, the ``SLMFLEET_SERVER`` / ``SLMFLEET_TOKEN`` environment
variables, the file ``slmfleet login`` writes (:func:`login_path`), and for the
server only the default ``http://127.0.0.1:8080`` that ``slmfleet dev`` uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

DEFAULT_SERVER = "http://127.0.0.1:8080"
#: plain API calls; uploads pass their own, longer timeouts
TIMEOUT = 15.0

console = Console(stderr=True)


class ApiError(RuntimeError):
    """A request failed; the message says what to do about it."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def login_path() -> Path:
    """Where ``slmfleet login`` keeps the server URL and token (mode 0600)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "slmfleet" / "cli.json"


def load_login() -> dict[str, str]:
    """The saved login, or ``{}`` when there is none or it cannot be read."""
    try:
        data = json.loads(login_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def save_login(server: str, token: str) -> Path:
    """Write the login file with mode 0600 (created so, never widened after)."""
    path = login_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"server": server, "token": token}, fh)
    os.replace(tmp, path)
    return path


def resolve(server: str | None, token: str | None) -> tuple[str, str | None]:
    """The server URL and token to use, after options, environment and login file."""
    saved = load_login()
    server = server or os.environ.get("SLMFLEET_SERVER") or saved.get("server") or DEFAULT_SERVER
    token = token or os.environ.get("SLMFLEET_TOKEN") or saved.get("token")
    return server.rstrip("/"), token


def detail(response: Any) -> str:
    """The human part of an error response (FastAPI's ``detail``), kept short."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    found = body.get("detail") if isinstance(body, dict) else body
    if isinstance(found, dict):
        return str(found.get("message") or found)
    return str(found)


_HINTS = {
    401: "the token is missing, wrong, expired or revoked: run `slmfleet login` or pass --token",
    403: "this token's role may not do that: ask an admin for an operator or admin token",
}


class ApiClient:
    """A thin httpx client bound to one server and token."""

    def __init__(self, server: str | None = None, token: str | None = None,
                 timeout: Any = TIMEOUT) -> None:
        import httpx

        self.server, self.token = resolve(server, token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200, 201, 202, 204),
                **kwargs: Any) -> Any:
        """Send one request; the response when its status is in ``ok``, else :class:`ApiError`."""
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach {self.server} ({exc}); is the control plane "
                           "running? check --server or `slmfleet login`") from exc
        if response.status_code not in ok:
            hint = _HINTS.get(response.status_code)
            message = f"HTTP {response.status_code} from {method} {path}: {detail(response)}"
            raise ApiError(f"{message}; {hint}" if hint else message, response.status_code)
        return response

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` and return the decoded JSON body."""
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None}).json()

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``body`` as JSON and return the decoded JSON body (``None`` when empty)."""
        response = self.request("POST", path, json=body)
        return response.json() if response.content else None

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list route (``items`` + ``next`` cursor)."""
        cursor = None
        while True:
            page = self.get(path, cursor=cursor, **params)
            yield from page["items"]
            cursor = page.get("next")
            if not cursor:
                return


# --- publishing a release: controlplane/publishing.py ----------------------


class PublishError(RuntimeError):
    """Publishing stopped; the message says what to fix."""


def publish_release(
    spec_path: Path, key_paths: list[Path], server: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """Hash, sign, upload what the store lacks and register; return the registered
    version (API JSON). A file hashed by an earlier call in this process is not
    read again. :func:`controlplane.publishing.publish` also returns the figures.
    """
    from .publishing import publish

    return publish(spec_path, key_paths, server, token, remember=True).version
