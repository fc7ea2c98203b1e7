"""``slmfleet models``: publish a signed release from a spec; list and show the registry."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

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

from .api_client import SERVER_HELP, TOKEN_HELP, ApiClient, ApiError, api_call, fail
from .output import OUTPUT_OPTION, Output, emit, emit_json

app = typer.Typer(help="Publish signed model releases and list them.", no_args_is_help=True)
console = Console(stderr=True)

CHUNK = 1 << 20
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

    ``server`` and ``token`` resolve as for every command (:mod:`.api_client`).
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
            with ApiClient(server, token, timeout=httpx.Timeout(**TIMEOUT)) as client:
                for tier, variant in spec.variants.items():
                    sha256, size = measured[tier]
                    path = artifact_path(spec, tier)
                    outcome = _upload(client, path, variant.file, sha256, size, progress)
                    console.print(f"{tier.value}: {path} {outcome}")
                response = client.request(
                    "POST",
                    "/v1/models",
                    content=canonical_json(envelope),
                    headers={"Content-Type": "application/json"},
                )
        except ApiError as exc:
            raise PublishError(f"publishing {manifest.ref} failed: {exc}") from exc
    return response.json()


@app.command()
def publish(
    spec: Path = typer.Option(..., "--spec", help="release spec (YAML)", dir_okay=False),
    key: list[Path] = typer.Option(
        ..., "--key", help="release private key file; repeat to meet the threshold"
    ),
    server: str | None = typer.Option(None, "--server", help=SERVER_HELP),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP),
    output: Output = OUTPUT_OPTION,
) -> None:
    """Hash the spec's files, sign the manifest, upload the artifacts, register the release."""
    try:
        version = publish_release(spec, key, server, token)
    except PublishError as exc:
        raise fail(exc) from exc
    if output is Output.JSON:
        emit_json(version)
        return
    tiers = ", ".join(v["tier"] for v in version["variants"])
    typer.echo(f"published {version['name']}@{version['version']} ({tiers})")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


@app.command("list")
def list_(
    server: str | None = typer.Option(None, "--server", help=SERVER_HELP),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP),
    output: Output = OUTPUT_OPTION,
) -> None:
    """Registered models and their newest versions."""
    models = api_call(server, token, lambda client: list(client.pages("/v1/models")))
    table = Table(title="models")
    for column in ("name", "latest", "description"):
        table.add_column(column)
    for m in models:
        table.add_row(m["name"], m["latest_version"] or "-", m["description"])
    emit(output, models, table)


@app.command()
def show(
    name: str = typer.Argument(..., help="model name"),
    version: str | None = typer.Argument(None, help="a version: show its variants"),
    server: str | None = typer.Option(None, "--server", help=SERVER_HELP),
    token: str | None = typer.Option(None, "--token", help=TOKEN_HELP),
    output: Output = OUTPUT_OPTION,
) -> None:
    """A model's versions, or one version's variants."""
    try:
        with ApiClient(server, token) as client:
            if version is None:
                found: Any = list(client.pages(f"/v1/models/{quote(name, safe='')}/versions"))
            else:
                found = client.get(
                    f"/v1/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"
                )
    except ApiError as exc:
        raise fail(exc) from exc
    if version is None:
        table = Table(title=name)
        for column in ("version", "released", "registered", "description"):
            table.add_column(column)
        for v in found:
            table.add_row(v["version"], _when(v["released_at"]), _when(v["registered_at"]),
                          v["description"])
        emit(output, found, table)
        return
    table = Table(title=f"{name}@{version}")
    for column in ("tier", "format", "quant", "params", "context", "size", "artifact"):
        table.add_column(column)
    for v in found["variants"]:
        table.add_row(
            v["tier"],
            v["format"],
            v["quantization"] or "-",
            f"{v['parameters'] / 1e6:.0f}M",
            str(v["context_length"]),
            f"{v['size_bytes'] / 1e6:.1f} MB",
            v["artifact"],
        )
    emit(output, found, table)
