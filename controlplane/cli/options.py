"""What every admin command shares: where the API is, how errors end the command.

A command that calls the API is registered with :func:`api_command`: it
gets ``--server``, ``--token`` (and ``--output``) after its own parameters,
and an :class:`Api` handle carrying their values as its first argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_type_hints

import typer
from rich.console import Console, RenderableType

from ..client import ApiClient, ApiError
from .output import Output, OutputOption, emit

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


@dataclass(frozen=True)
class Api:
    """A command's ``--server``, ``--token`` and ``--output``, and calls made with them."""

    server: str | None
    token: str | None
    output: Output = Output.TABLE

    @property
    def json(self) -> bool:
        """Whether the result is to be printed as JSON."""
        return self.output is Output.JSON

    def call(self, call: Callable[[ApiClient], T]) -> T:
        """:func:`api_call` with this server and token."""
        return api_call(self.server, self.token, call)

    def list(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """:func:`api_list` with this server and token."""
        return api_list(self.server, self.token, path, **params)

    def emit(self, data: Any, view: RenderableType) -> None:
        """Print ``view`` (a table), or ``data`` as JSON when ``--output json`` asked for it."""
        emit(self.output, data, view)


_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_API_PARAMETERS = (
    inspect.Parameter("server", _KEYWORD, default=None, annotation=ServerOption),
    inspect.Parameter("token", _KEYWORD, default=None, annotation=TokenOption),
)
_OUTPUT_PARAMETER = inspect.Parameter(
    "output", _KEYWORD, default=Output.TABLE, annotation=OutputOption
)


def api_command(
    app: typer.Typer, name: str | None = None, *, output: bool = True
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``command(api, ...)`` as the command ``name`` of ``app``.

    The command line gets the function's parameters after ``api``, then
    ``--server``, ``--token`` and, unless ``output`` is false, ``--output``;
    the function gets them back as one :class:`Api`. Help comes from its
    docstring.
    """

    def register(command: Callable[..., None]) -> Callable[..., None]:
        hints = get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in list(inspect.signature(command).parameters.values())[1:]
        ]
        extra = [*_API_PARAMETERS, _OUTPUT_PARAMETER] if output else list(_API_PARAMETERS)

        def run(
            *args: Any,
            server: str | None = None,
            token: str | None = None,
            output: Output = Output.TABLE,
            **kwargs: Any,
        ) -> None:
            command(Api(server, token, output), *args, **kwargs)

        # Typer reads the parameters from the signature, so the options are
        # declared once here rather than in every command.
        run.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
        run.__annotations__ = {}
        run.__doc__ = command.__doc__
        run.__name__ = command.__name__
        app.command(name)(run)
        return command

    return register
