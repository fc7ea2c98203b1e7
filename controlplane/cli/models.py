"""``slmfleet models``: publish a signed release from a spec; list and show the registry."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

app = typer.Typer(help="Publish signed model releases and list them.", no_args_is_help=True)
console = Console(stderr=True)

CHUNK = 1 << 20
SERVER_HELP = "control-plane API base URL (the `API` line of `slmfleet dev`)"
#: uploads of large models take a while; connecting should not
TIMEOUT = {"connect": 10.0, "read": 300.0, "write": 300.0, "pool": 10.0}


@app.callback()
def _group() -> None:
    """Publish signed model releases and list them."""


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


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, dict):
        return str(detail.get("message") or detail)
    return str(detail)


def _chunks(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            progress.advance(task, len(chunk))
            yield chunk


def _upload(client: Any, server: str, path: str, file: Path, sha256: str, size: int,
            progress: Progress) -> str:
    url = f"{server}/v1/artifacts/{path}"
    head = client.head(url)
    if head.status_code == 200:
        if head.headers.get("etag", "").strip('"') == sha256:
            return "already uploaded"
        raise PublishError(
            f"{path} already holds a different file on the server; publish a new version "
            "or set `artifact:` in the spec"
        )
    if head.status_code != 404:
        raise PublishError(f"HEAD {url}: HTTP {head.status_code}")
    task = progress.add_task(f"upload {file.name}", total=size)
    response = client.put(
        url,
        content=_chunks(file, progress, task),
        headers={
            "X-Content-SHA256": sha256,
            "Content-Length": str(size),
            "Content-Type": "application/octet-stream",
        },
    )
    if response.status_code not in (200, 201):
        raise PublishError(f"upload of {path} failed: HTTP {response.status_code}: "
                           f"{_detail(response)}")
    return "uploaded"


def publish_release(spec_path: Path, key_paths: list[Path], server: str) -> dict[str, Any]:
    """Hash, sign, upload and register; return the registered version (API JSON)."""
    import httpx

    from controlplane.keyfiles import KeyFileError, read_private_key
    from controlplane.release_spec import SpecError, artifact_path, build_manifest, load_spec
    from protocol import canonical_json, sign_release

    server = server.rstrip("/")
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
            with httpx.Client(timeout=httpx.Timeout(**TIMEOUT)) as client:
                for tier, variant in spec.variants.items():
                    sha256, size = measured[tier]
                    path = artifact_path(spec, tier)
                    outcome = _upload(client, server, path, variant.file, sha256, size, progress)
                    console.print(f"{tier.value}: {path} {outcome}")
                response = client.post(
                    f"{server}/v1/models",
                    content=canonical_json(envelope),
                    headers={"Content-Type": "application/json"},
                )
        except httpx.TransportError as exc:
            raise PublishError(
                f"cannot reach {server} ({exc}); is the control plane running? check --server"
            ) from exc
    if response.status_code not in (200, 201):
        raise PublishError(f"registering {manifest.ref} failed: HTTP {response.status_code}: "
                           f"{_detail(response)}")
    return response.json()


@app.command()
def publish(
    spec: Path = typer.Option(..., "--spec", help="release spec (YAML)", dir_okay=False),
    key: list[Path] = typer.Option(
        ..., "--key", help="release private key file; repeat to meet the threshold"
    ),
    server: str = typer.Option("http://127.0.0.1:8080", "--server", help=SERVER_HELP),
) -> None:
    """Hash the spec's files, sign the manifest, upload the artifacts, register the release."""
    try:
        version = publish_release(spec, key, server)
    except PublishError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    tiers = ", ".join(v["tier"] for v in version["variants"])
    typer.echo(f"published {version['name']}@{version['version']} ({tiers})")


def _get(server: str, path: str) -> Any:
    import httpx

    try:
        response = httpx.get(f"{server.rstrip('/')}{path}", timeout=10.0)
    except httpx.TransportError as exc:
        console.print(f"[red]error:[/red] cannot reach {server} ({exc}); check --server")
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        console.print(f"[red]error:[/red] HTTP {response.status_code}: {_detail(response)}")
        raise typer.Exit(1)
    return response.json()


@app.command("list")
def list_(
    server: str = typer.Option("http://127.0.0.1:8080", "--server", help=SERVER_HELP),
) -> None:
    """Registered models and their newest versions."""
    table = Table(title="models")
    for column in ("name", "latest", "description"):
        table.add_column(column)
    cursor = None
    while True:
        page = _get(server, "/v1/models" + (f"?cursor={cursor}" if cursor else ""))
        for m in page["items"]:
            table.add_row(m["name"], m["latest_version"] or "-", m["description"])
        cursor = page["next"]
        if not cursor:
            break
    Console().print(table)


@app.command()
def show(
    name: str = typer.Argument(..., help="model name"),
    version: str | None = typer.Argument(None, help="a version: show its variants"),
    server: str = typer.Option("http://127.0.0.1:8080", "--server", help=SERVER_HELP),
) -> None:
    """A model's versions, or one version's variants."""
    out = Console()
    if version is None:
        table = Table(title=name)
        for column in ("version", "released", "registered", "description"):
            table.add_column(column)
        for v in _get(server, f"/v1/models/{name}/versions")["items"]:
            table.add_row(
                v["version"],
                time.strftime("%Y-%m-%d %H:%M", time.gmtime(v["released_at"])),
                time.strftime("%Y-%m-%d %H:%M", time.gmtime(v["registered_at"])),
                v["description"],
            )
        out.print(table)
        return
    detail = _get(server, f"/v1/models/{name}/versions/{version}")
    table = Table(title=f"{name}@{version}")
    for column in ("tier", "format", "quant", "params", "context", "size", "artifact"):
        table.add_column(column)
    for v in detail["variants"]:
        table.add_row(
            v["tier"],
            v["format"],
            v["quantization"] or "-",
            f"{v['parameters'] / 1e6:.0f}M",
            str(v["context_length"]),
            f"{v['size_bytes'] / 1e6:.1f} MB",
            v["artifact"],
        )
    out.print(table)
