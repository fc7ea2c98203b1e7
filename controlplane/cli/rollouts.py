"""``slmfleet rollouts``: start staged rollouts, watch them, and steer them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.live import Live

from protocol import parse_yaml_mapping

from ..client import ApiClient, ApiError
from .options import Api, api_command, fail
from .output import emit_json, titled_table
from .rollout_view import rollout_view

app = typer.Typer(help="Staged canary rollouts of model releases.", no_args_is_help=True)

#: a spec file larger than this is certainly not a rollout spec
MAX_SPEC_BYTES = 1 << 20


@app.callback()
def _group() -> None:
    """Staged canary rollouts of model releases."""


def read_spec(path: Path) -> dict[str, Any]:
    """The spec in ``path`` (YAML or JSON) as a mapping; ``ValueError`` naming the problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_yaml_mapping(
        raw, f"rollout spec {path}", max_bytes=MAX_SPEC_BYTES,
        expected="a mapping (model, version, target, stages)",
    )


@api_command(app)
def create(
    api: Api,
    file: Path = typer.Option(..., "--file", "-f", help="rollout spec (YAML or JSON)",
                              dir_okay=False),
) -> None:
    """Start a rollout from a spec file (see examples/rollout.yaml)."""
    try:
        spec = read_spec(file)
        with ApiClient(api.server, api.token) as client:
            detail = client.post("/v1/rollouts", spec)
    except (ValueError, ApiError) as exc:
        raise fail(exc) from exc
    if api.json:
        emit_json(detail)
        return
    typer.echo(f"rollout {detail['id']} of {detail['model']}@{detail['version']} "
               f"started: {detail['state']}; follow it with `slmfleet rollouts watch "
               f"{detail['id']}`")


@api_command(app, "list")
def list_(
    api: Api,
    state: str | None = typer.Option(None, "--state", help="only rollouts in this state"),
) -> None:
    """Rollouts, newest first."""
    items = api.list("/v1/rollouts", state=state)
    table = titled_table("rollouts", "id", "release", "state", "stage", "created", "reason")
    for r in items:
        table.add_row(r["id"], f"{r['model']}@{r['version']}", r["state"],
                      f"{r['stage']}/{r['stages']} ({r['percent']:g} %)",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
                      r["reason"] or "")
    api.emit(items, table)


@api_command(app)
def show(api: Api, rollout_id: str = typer.Argument(..., help="rollout id (r-…)")) -> None:
    """Stages, tiers, gates and timeline of one rollout."""
    detail = api.call(lambda client: client.get(f"/v1/rollouts/{rollout_id}"))
    api.emit(detail, rollout_view(detail))


@api_command(app, output=False)
def watch(
    api: Api,
    rollout_id: str = typer.Argument(..., help="rollout id (r-…)"),
    interval: float = typer.Option(1.0, "--interval", min=0.2, max=60, help="seconds per refresh"),
    timeout: float = typer.Option(3600.0, "--timeout", min=1, help="stop watching after this"),
) -> None:
    """A live view of a rollout until it completes, rolls back or is aborted."""
    # Imported here: the rest of the CLI has no need of the database package.
    from controlplane.db.statuses import FINISHED_ROLLOUT_STATES as FINISHED

    deadline = time.monotonic() + timeout
    try:
        with ApiClient(api.server, api.token) as client:
            detail = client.get(f"/v1/rollouts/{rollout_id}")
            with Live(rollout_view(detail), refresh_per_second=4) as live:
                while detail["state"] not in FINISHED and time.monotonic() < deadline:
                    time.sleep(interval)
                    detail = client.get(f"/v1/rollouts/{rollout_id}")
                    live.update(rollout_view(detail))
    except ApiError as exc:
        raise fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"{rollout_id}: {detail['state']}")


def _action(name: str, doc: str) -> None:
    def command(
        api: Api,
        rollout_id: str = typer.Argument(..., help="rollout id (r-…)"),
        reason: str | None = typer.Option(None, "--reason", help="recorded in the timeline"),
    ) -> None:
        detail = api.call(lambda client: client.post(
            f"/v1/rollouts/{rollout_id}/{name}", {"reason": reason} if reason else None
        ))
        typer.echo(f"{rollout_id}: {detail['state']}")

    command.__doc__ = doc
    api_command(app, name, output=False)(command)


_action("pause", "Stop sending anything new; devices keep what they have.")
_action("resume", "Continue a paused rollout; the current stage bakes afresh.")
_action("approve", "Let a stage that waits for approval start.")
_action("abort", "End the rollout; devices keep what they run now.")
_action("rollback", "Send every device the rollout touched back to its previous version.")
