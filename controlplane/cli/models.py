"""``slmfleet models``: publish a signed release from a spec; list and show the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer

from ..client import PublishError
from ..publishing import PublishSummary
from ..publishing import publish as publish_spec
from .options import Api, api_command, fail
from .output import emit_json, titled_table, when

app = typer.Typer(help="Publish signed model releases and list them.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Publish signed model releases and list them."""


@api_command(app)
def publish(
    api: Api,
    spec: Path = typer.Option(..., "--spec", help="release spec (YAML)", dir_okay=False),
    key: list[Path] = typer.Option(
        ..., "--key", help="release private key file; repeat to meet the threshold"
    ),
) -> None:
    """Hash the spec's files, sign the manifest, upload what the store lacks, register."""
    try:
        done = publish_spec(spec, key, api.server, api.token)
    except PublishError as exc:
        raise fail(exc) from exc
    version = done.version
    if api.json:
        emit_json({**version, "publish": done.summary.as_dict()})
        return
    tiers = ", ".join(v["tier"] for v in version["variants"])
    typer.echo(f"published {version['name']}@{version['version']} ({tiers})")
    typer.echo(_summary_line(done.summary))


def _summary_line(s: PublishSummary) -> str:
    return (f"{s.files} files, {s.blobs} distinct ({s.bytes_total / 1e6:.1f} MB): "
            f"sent {s.uploads} ({s.bytes_sent / 1e6:.1f} MB), "
            f"already held {s.blobs - s.uploads} ({s.bytes_held / 1e6:.1f} MB) "
            f"in {s.total_s:.1f} s")


@api_command(app)
def gc(
    api: Api,
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would go; remove nothing"),
    grace: float = typer.Option(
        3600.0, "--grace", min=0, help="keep files stored or asked for less than this many "
        "seconds ago (a publish in progress)"),
) -> None:
    """Remove stored model files no registered release refers to (admin)."""
    done = api.call(lambda client: client.post(
        "/v1/blobs/gc", {"dry_run": dry_run, "grace_s": grace}))
    if api.json:
        emit_json(done)
        return
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(done['removed_blobs'])} files ({done['removed_bytes'] / 1e6:.1f} MB)"
               f" and {len(done['removed_paths'])} unreferenced paths; kept "
               f"{done['kept_blobs']} files ({done['kept_bytes'] / 1e6:.1f} MB)")
    for sha256 in done["removed_blobs"]:
        typer.echo(f"  {sha256}")


@api_command(app, "list")
def list_(api: Api) -> None:
    """Registered models and their newest versions."""
    models = api.list("/v1/models")
    table = titled_table("models", "name", "latest", "description")
    for m in models:
        table.add_row(m["name"], m["latest_version"] or "-", m["description"])
    api.emit(models, table)


@api_command(app)
def show(
    api: Api,
    name: str = typer.Argument(..., help="model name"),
    version: str | None = typer.Argument(None, help="a version: show its variants"),
) -> None:
    """A model's versions, or one version's variants."""
    path = f"/v1/models/{quote(name, safe='')}/versions"
    if version is None:
        found: Any = api.list(path)
    else:
        found = api.call(lambda client: client.get(f"{path}/{quote(version, safe='')}"))
    if version is None:
        table = titled_table(name, "version", "released", "registered", "description")
        for v in found:
            table.add_row(v["version"], when(v["released_at"]), when(v["registered_at"]),
                          v["description"])
        api.emit(found, table)
        return
    table = titled_table(
        f"{name}@{version}", "tier", "format", "quant", "params", "context", "size", "artifact"
    )
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
    api.emit(found, table)


@app.command("build", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def build(ctx: typer.Context) -> None:
    """Quantize a model into tier variants on this machine, measure each, emit a release spec."""
    # The `slmfleet` entry point hands `models build` to the build before this
    # app is made (the control plane never imports llama.cpp); this entry only
    # lists the command here.
    typer.echo("run it as `slmfleet models build SPEC` (see docs/build.md)", err=True)
    raise typer.Exit(2)
