"""The control-plane API from Python: one client for the admin CLI, ``slmfleet dev``,
the benchmarks and the tests, with one place for the server URL, the bearer
token, timeouts and error messages that name the fix, and the operations
made of several calls (:func:`publish_release`).

Where the server and token come from, first found wins: the ``--server`` /
``--token`` options, the ``SLMFLEET_SERVER`` / ``SLMFLEET_TOKEN`` environment
variables, the file ``slmfleet login`` writes (:func:`login_path`), and for the
server only the default ``http://127.0.0.1:8080`` that ``slmfleet dev`` uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

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


# --- publishing a release: hash, sign, upload, register ----------------------

CHUNK = 1 << 20
#: uploads of large models take a while; connecting should not
UPLOAD_TIMEOUT = {"connect": 10.0, "read": 300.0, "write": 300.0, "pool": 10.0}


class PublishError(RuntimeError):
    """Publishing stopped; the message says what to fix."""


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _hash(path: Path, progress: Progress) -> tuple[str, int]:
    size = path.stat().st_size
    task = progress.add_task(f"hash   {path.name}", total=size)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            progress.advance(task, len(chunk))
    return digest.hexdigest(), size


def _chunks(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            progress.advance(task, len(chunk))
            yield chunk


def _upload(client: ApiClient, path: str, file: Path, sha256: str, size: int,
            progress: Progress) -> str:
    url = f"/v1/artifacts/{path}"
    head = client.request("HEAD", url, ok=(200, 404))
    if head.status_code == 200:
        if head.headers.get("etag", "").strip('"') == sha256:
            return "already uploaded"
        raise PublishError(
            f"{path} already holds a different file on the server; publish a new version "
            "or set `artifact:` in the spec"
        )
    task = progress.add_task(f"upload {file.name}", total=size)
    try:
        client.request(
            "PUT",
            url,
            content=_chunks(file, progress, task),
            headers={
                "X-Content-SHA256": sha256,
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
            },
        )
    except ApiError as exc:
        raise PublishError(f"upload of {path} failed: {exc}") from exc
    return "uploaded"


def publish_release(
    spec_path: Path, key_paths: list[Path], server: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """Hash, sign, upload and register; return the registered version (API JSON).

    ``server`` and ``token`` resolve as for every command (:func:`resolve`).
    """
    import httpx

    from controlplane.keyfiles import KeyFileError, read_private_key
    from controlplane.release_spec import SpecError, artifact_path, build_manifest, load_spec
    from protocol import canonical_json, sign_release

    try:
        spec = load_spec(spec_path)
        keys = [read_private_key(path, "release") for path in key_paths]
    except (SpecError, KeyFileError) as exc:
        raise PublishError(str(exc)) from exc
    for tier, variant in spec.variants.items():
        if not variant.file.is_file():
            raise PublishError(f"variants.{tier.value}.file: {variant.file} does not exist")

    with _progress() as progress:
        measured = {tier: _hash(v.file, progress) for tier, v in spec.variants.items()}
        try:
            manifest = build_manifest(spec, measured, released_at=time.time())
            envelope = sign_release(manifest, keys)
        except (SpecError, ValueError) as exc:
            raise PublishError(str(exc)) from exc
        try:
            with ApiClient(server, token, timeout=httpx.Timeout(**UPLOAD_TIMEOUT)) as client:
                for tier, variant in spec.variants.items():
                    sha256, size = measured[tier]
                    path = artifact_path(spec, tier)
                    outcome = _upload(client, path, variant.file, sha256, size, progress)
                    console.print(f"{tier.value}: {path} {outcome}")
                if spec.eval_set is not None and manifest.eval_set is not None:
                    ref = manifest.eval_set
                    outcome = _upload(client, ref.artifact, spec.eval_set.path, ref.sha256,
                                      ref.size_bytes, progress)
                    console.print(f"eval set: {ref.artifact} {outcome}")
                response = client.request(
                    "POST",
                    "/v1/models",
                    content=canonical_json(envelope),
                    headers={"Content-Type": "application/json"},
                )
        except ApiError as exc:
            raise PublishError(f"publishing {manifest.ref} failed: {exc}") from exc
    return response.json()
