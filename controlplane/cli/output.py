"""``--output table|json`` for every command that prints data."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table


class Output(StrEnum):
    """How a command prints its result."""

    TABLE = "table"
    JSON = "json"


OUTPUT_OPTION = typer.Option(
    Output.TABLE, "--output", "-o", help="table for people, json for scripts"
)


def emit_json(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def emit(output: Output, data: Any, table: Table) -> None:
    """Print ``table``, or ``data`` as JSON when asked for."""
    if output is Output.JSON:
        emit_json(data)
    else:
        Console().print(table)
