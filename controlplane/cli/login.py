"""``slmfleet login``: check a server URL and token, then remember them (mode 0600)."""

from __future__ import annotations

import typer

from ..client import save_login
from .options import api_call


def login(
    server: str = typer.Option(..., "--server", help="control-plane API base URL"),
    token: str = typer.Option(
        ..., "--token", prompt=True, hide_input=True, envvar="SLMFLEET_TOKEN",
        help="API token (prompted for when not given, so it stays out of shell history)",
    ),
) -> None:
    """Check the token against the server, then save both for later commands."""
    me = api_call(server, token, lambda client: client.get("/v1/auth/whoami"))
    path = save_login(server.rstrip("/"), token)
    typer.echo(f"logged in to {server.rstrip('/')} as {me['name']} ({me['role']}); saved to {path}")
