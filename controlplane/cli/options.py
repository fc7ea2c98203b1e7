"""What every admin command shares: where the API is, how errors end the command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ..client import ApiClient, ApiError

T = TypeVar("T")

SERVER_HELP = "control-plane API base URL (default: `slmfleet login`, then $SLMFLEET_SERVER)"
TOKEN_HELP = "API token (default: `slmfleet login`, then $SLMFLEET_TOKEN)"

#: ``--server``, for every command that calls the API (default ``None``)
ServerOption = Annotated[str | None, typer.Option("--server", help=SERVER_HELP)]
#: ``--token``, for every command that calls the API (default ``None``)
TokenOption = Annotated[str | None, typer.Option("--token", help=TOKEN_HELP)]

err_console = Console(stderr=True)


def fail(exc: Exception) -> typer.Exit:
    """Print ``exc`` as a CLI error and return the exit to raise."""
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


def api_call(server: str | None, token: str | None, call: Callable[[ApiClient], T]) -> T:
    """``call(client)`` with a client for ``server`` and ``token``; what it returns.

    An :class:`ApiError` (unreachable server, refused token, HTTP error)
    becomes the CLI's error message and exit status 1.
    """
    try:
        with ApiClient(server, token) as client:
            return call(client)
    except ApiError as exc:
        raise fail(exc) from exc


def api_list(
    server: str | None, token: str | None, path: str, **params: Any
) -> list[dict[str, Any]]:
    """Every item of the paginated list at ``path``, all pages; errors as in :func:`api_call`."""
    return api_call(server, token, lambda client: list(client.pages(path, **params)))
