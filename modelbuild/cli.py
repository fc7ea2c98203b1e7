"""``slmfleet models build SPEC``: the command (the build itself is :mod:`.build`)."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class OutputKind(StrEnum):
    """How the report is printed."""

    TABLE = "table"
    JSON = "json"


def default_build_dir() -> Path:
    """``$SLMFLEET_CACHE/model-builds`` (the cache scripts/bootstrap.sh uses)."""
    cache = os.environ.get("SLMFLEET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slmfleet")
    return Path(cache) / "model-builds"


@app.command()
def build(
    spec: Path = typer.Argument(..., help="build spec (YAML; see docs/build.md)", dir_okay=False),
    build_dir: Path = typer.Option(None, "--build-dir",
                                   help="where variants and figures are kept between builds",
                                   show_default="~/.cache/slmfleet/model-builds"),
    out: Path = typer.Option(None, "--out", help="release spec to write",
                             show_default="NAME-VERSION.release.yaml in the build directory"),
    output: OutputKind = typer.Option(OutputKind.TABLE, "--output", help="table or json"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Quantize a model into candidate variants, measure each, choose one per tier."""
    from .build import run_build
    from .choose import NoVariantFits
    from .perplexity import PerplexityError
    from .quantize import QuantizeError
    from .spec import BuildSpecError

    err = Console(stderr=True)
    try:
        result = run_build(spec, build_dir or default_build_dir(), out=out,
                           console=None if quiet else err)
    except NoVariantFits as exc:
        if exc.report is not None:
            _show(exc.report, output)
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    except (BuildSpecError, QuantizeError, PerplexityError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    _show(result.report, output)
    variants = result.report["variants"]
    reused = sum(1 for v in variants if v["reused"])
    err.print(f"{reused} of {len(variants)} variants reused from {result.report['build_dir']}",
              highlight=False)


def _show(report: dict, output: OutputKind) -> None:
    from .report import print_report

    if output is OutputKind.JSON:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        # a pipe or a log file gets the whole table, not one cut to 80 columns
        print_report(report, Console(width=None if sys.stdout.isatty() else 160))


def main(argv: list[str]) -> None:
    """Run ``slmfleet models build`` with ``argv`` (the words after ``build``)."""
    app(args=argv, prog_name="slmfleet models build")
