"""``--output table|json`` for every command that prints data, and how its cells read."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table


class Output(StrEnum):
    """How a command prints its result."""

    TABLE = "table"
    JSON = "json"


#: ``--output/-o``; give it the default ``Output.TABLE``
OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for scripts")
]


def when(ts: float | None, *, seconds: bool = False) -> str:
    """``ts`` (Unix time) as a UTC ``YYYY-MM-DD HH:MM[:SS]`` cell; ``-`` when unset."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M", time.gmtime(ts))


def titled_table(title: str, *columns: str, **options: Any) -> Table:
    """An empty table called ``title`` with ``columns``; ``options`` go to :class:`Table`."""
    table = Table(title=title, **options)
    for column in columns:
        table.add_column(column)
    return table


def emit_json(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def emit(output: Output, data: Any, view: RenderableType) -> None:
    """Print ``view`` (a table), or ``data`` as JSON when asked for."""
    if output is Output.JSON:
        emit_json(data)
    else:
        Console().print(view)
