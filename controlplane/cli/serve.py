"""``slmfleet controlplane serve``: run the control plane in the foreground."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(help="Run the control plane.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Run the control plane."""


@app.command()
def serve(
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="TOML settings file; SLMFLEET_<FIELD> environment variables override it",
        dir_okay=False,
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Serve the API, ingest device messages and run the scheduler until SIGINT/SIGTERM."""
    from controlplane.config import SettingsError, load_settings
    from controlplane.ingest import MqttAuthError
    from controlplane.service import ControlPlane

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    controlplane = ControlPlane(settings)
    try:
        controlplane.start()
    except (MqttAuthError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"API {controlplane.api_url}")
    controlplane.serve_forever()
