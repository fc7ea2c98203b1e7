"""``slmfleet policies``: default update policies by device label or firmware profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from .options import Api, api_command
from .output import titled_table, when

app = typer.Typer(help="Default update policies (windows, rate cap, metered links) by label "
                       "or firmware profile.", no_args_is_help=True)

SELECTOR_HELP = "label KEY=VALUE, or profile NAME"


@app.callback()
def _group() -> None:
    """Default update policies by device label or firmware profile: set, list, remove."""


def _window(w: dict[str, Any] | None) -> str:
    return "-" if not w else f"{w['cron']} for {w['duration_s']} s ({w['tz']})"


def policy_table(items: list[dict[str, Any]]) -> Table:
    """One row per default, as ``GET /v1/update-policies`` lists them."""
    table = titled_table("update policy defaults", "applies to", "download window",
                         "activation window", "max bytes/s", "metered", "updated")
    for d in items:
        p = d["policy"]
        who = f"label {d['key']}={d['value']}" if d["selector"] == "label" \
            else f"profile {d['key']}"
        metered = "-" if p.get("allow_metered") is None else \
            ("allowed" if p["allow_metered"] else "held")
        table.add_row(who, _window(p.get("download_window")), _window(p.get("activation_window")),
                      str(p.get("max_bytes_per_s") or "-"), metered,
                      when(d["updated_at"], seconds=True))
    return table


def _path(selector: str, name: str) -> str:
    if selector == "profile":
        return f"/v1/update-policies/profile/{quote(name, safe='')}"
    if selector != "label":
        raise typer.BadParameter(f"{selector!r}: say label or profile")
    key, sep, value = name.partition("=")
    if not sep or not key or not value:
        raise typer.BadParameter(f"a label is KEY=VALUE, got {name!r}")
    return f"/v1/update-policies/label/{quote(key, safe='')}/{quote(value, safe='')}"


@api_command(app, "list")
def list_(api: Api) -> None:
    """Every default update policy: profiles first, then labels."""
    items = api.call(lambda client: client.get("/v1/update-policies"))["items"]
    api.emit(items, policy_table(items))


@api_command(app, "set")
def set_(
    api: Api,
    selector: str = typer.Argument(..., help="label or profile"),
    name: str = typer.Argument(..., help="KEY=VALUE for a label, the profile's name"),
    file: Path = typer.Option(..., "--file", "-f", exists=True, dir_okay=False,
                              help="YAML or JSON: download_window, activation_window "
                                   "(cron, duration_s, tz), max_bytes_per_s, allow_metered"),
) -> None:
    """Set the default update policy of a label or profile (assignments made from now on)."""
    import yaml

    body = yaml.safe_load(file.read_text(encoding="utf-8"))
    done = api.call(lambda client: client.request("PUT", _path(selector, name), json=body)
                    .json())
    api.emit(done, policy_table([done]))


@api_command(app, output=False)
def remove(
    api: Api,
    selector: str = typer.Argument(..., help="label or profile"),
    name: str = typer.Argument(..., help="KEY=VALUE for a label, the profile's name"),
) -> None:
    """Remove a default (admin); entries already signed keep theirs."""
    api.call(lambda client: client.request("DELETE", _path(selector, name)))
    typer.echo(f"removed the default update policy of {selector} {name}")
