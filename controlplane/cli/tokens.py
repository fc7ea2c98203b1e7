"""``slmfleet tokens``: issue, list and revoke API tokens (needs an admin token)."""

from __future__ import annotations

import re
import time
from typing import Any

import typer

from .options import Api, api_command
from .output import emit_json, titled_table, when

app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400, "y": 365 * 86_400}
_DURATION = re.compile(r"^(\d+)([smhdwy])$")


@app.callback()
def _group() -> None:
    """API tokens: create, list, revoke."""


def parse_expiry(text: str) -> int | None:
    """``90d``, ``12h``, ``30m``, ``1y`` as seconds; ``never`` as None."""
    if text.strip().lower() == "never":
        return None
    found = _DURATION.match(text.strip().lower())
    if not found:
        raise typer.BadParameter("use a number and a unit (s, m, h, d, w, y), e.g. 90d, or never")
    return int(found[1]) * _UNITS[found[2]]



def _status(t: dict[str, Any], now: float) -> str:
    if t["revoked_at"]:
        return "revoked"
    if t["expires_at"] and t["expires_at"] <= now:
        return "expired"
    return "active"


@api_command(app)
def create(
    api: Api,
    name: str = typer.Option(..., "--name", help="who or what will hold it, e.g. ci-publisher"),
    role: str = typer.Option(..., "--role", help="viewer, operator or admin"),
    expires: str = typer.Option("90d", "--expires", help="lifetime (90d, 12h, 1y) or never"),
) -> None:
    """Issue a token. It is printed once and cannot be shown again."""
    if role not in ("viewer", "operator", "admin"):
        raise typer.BadParameter("viewer, operator or admin", param_hint="--role")
    body = {"name": name, "role": role, "expires_in_s": parse_expiry(expires)}
    issued = api.call(lambda client: client.post("/v1/tokens", body))
    if api.json:
        emit_json(issued)
        return
    typer.echo(f"issued {issued['role']} token {issued['name']!r} (id {issued['id']}, "
               f"expires {when(issued['expires_at']) if issued['expires_at'] else 'never'})")
    typer.echo("store it now; it is not shown again:", err=True)
    typer.echo(f"TOKEN {issued['token']}")


@api_command(app, "list")
def list_(api: Api) -> None:
    """Every token: id, name, role, state and when it was last used."""
    tokens = api.list("/v1/tokens")
    now = time.time()
    table = titled_table(
        "API tokens", "id", "name", "role", "state", "created", "expires", "last used"
    )
    for t in tokens:
        table.add_row(t["id"], t["name"], t["role"], _status(t, now), when(t["created_at"]),
                      when(t["expires_at"]) if t["expires_at"] else "never",
                      when(t["last_used_at"]))
    api.emit(tokens, table)


@api_command(app)
def revoke(
    api: Api,
    token_id: str = typer.Argument(..., help="the token's id (from `slmfleet tokens list`)"),
) -> None:
    """Revoke a token; requests with it are refused from now on."""
    revoked = api.call(lambda client: client.request("DELETE", f"/v1/tokens/{token_id}").json())
    if api.json:
        emit_json(revoked)
    else:
        typer.echo(f"revoked token {revoked['id']} ({revoked['name']}, {revoked['role']})")
