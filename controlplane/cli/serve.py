"""``slmfleet controlplane serve``: run the control plane in the foreground."""

from __future__ import annotations

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
    log_format: str = typer.Option(
        "text", "--log-format", envvar="SLMFLEET_LOG_FORMAT",
        help="text, or json: one JSON object per line (journald, log shippers)",
    ),
) -> None:
    """Serve the API, ingest device messages and run the scheduler until SIGINT/SIGTERM."""
    from controlplane.config import SettingsError, load_settings
    from controlplane.ingest import MqttAuthError
    from controlplane.logs import configure
    from controlplane.service import ControlPlane

    if log_format not in ("text", "json"):
        raise typer.BadParameter("text or json", param_hint="--log-format")
    configure(log_level, log_format)
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
