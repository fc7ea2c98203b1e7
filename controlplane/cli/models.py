"""``slmfleet models``: publish a signed release from a spec; list and show the registry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table

from ..client import ApiClient, ApiError, PublishError, publish_release
from .options import SERVER_HELP, TOKEN_HELP, api_call, fail
from .output import OUTPUT_OPTION, Output, emit, emit_json

app = typer.Typer(help="Publish signed model releases and list them.", no_args_is_help=True)
console = Console(stderr=True)



@app.callback()
def _group() -> None:
    """Publish signed model releases and list them."""


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
