"""`slmfleet dev`: broker, control plane and local agents in one command."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controlplane.cli.rollout_view import rollout_view

# Wide enough for the fleet table when the output is a pipe or a log file.
console = Console(width=None if sys.stdout.isatty() else 120)


def fleet_table(devices: list[dict]) -> Table:
    """A rich table of devices as returned by ``GET /v1/devices``: every model per device."""
    table = Table(title="fleet")
    for column in ("device", "tier", "profile", "online", "labels", "models", "form"):
        table.add_column(column)
    for d in devices:
        models = d.get("models") or {}
        table.add_row(
            d["id"],
            d.get("tier") or "?",
            d.get("profile") or "?",
            "yes" if d.get("online") else "no",
            ", ".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items())),
            "\n".join(f"{name}@{m.get('version')}" for name, m in sorted(models.items())) or "-",
            # "single": an agent that reads one model; the embedder waits for its upgrade
            d.get("assignment_form") or "single",
        )
    return table


def summary(detail: dict) -> str:
    """One sentence on how a rollout ended and why."""
    counts = detail["counts"]
    ref = f"{detail['model']}@{detail['version']}"
    if detail["state"] == "completed":
        return (f"[green]{ref} reached every compatible device[/green] "
                f"({counts.get('succeeded', 0)} updated, "
                f"{counts.get('incompatible', 0)} incompatible), canary first.")
    if detail["state"] == "rolled_back":
        touched = counts.get("rolled_back", 0)
        total = sum(counts.values())
        return (f"[yellow]{ref} stopped at stage {detail['stage']} and was rolled back[/yellow]: "
                f"{touched} of {total} device(s) ever received it, and they were sent back. "
                f"Why: {detail['reason']}")
    return f"{ref}: {detail['state']} ({detail['reason'] or 'stopped'})"


def dev(
    data_dir: Path = typer.Option(Path(".dev-data"), "--data-dir", help="state for this demo"),
    api_port: int = typer.Option(0, "--api-port", help="API port (0: pick a free one)"),
) -> None:
    """Run a local fleet (Mosquitto, control plane, three agents) and demo staged rollouts
    of a chat model with an embedding model beside it."""
    from controlplane.client import PublishError
    from controlplane.devfleet.fleet import DevFleet
    from controlplane.devfleet.mosquitto import find_mosquitto

    try:
        find_mosquitto()
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet = DevFleet(
        data_dir.resolve(), api_port=api_port, log=lambda m: console.print(f"• {escape(m)}")
    )
    try:
        fleet.start()
        console.print(fleet_table(fleet.wait_for_devices([])))
        print(f"API {fleet.api_url}", flush=True)
        print(f"TOKEN {fleet.token}", flush=True)
        print(f"CONSOLE {fleet.console_url} sign-in code {fleet.console_code}", flush=True)
        for device_id, url in fleet.agent_urls.items():
            print(f"AGENT {device_id} {url}", flush=True)
        for detail in fleet.demo(should_stop=stop.is_set):
            console.print(rollout_view(detail))
            console.print(summary(detail))
        if not stop.is_set():
            console.print(fleet_table(fleet.wait_for_devices([])))
        console.print(f"OpenAPI docs at {fleet.api_url}/docs — Ctrl-C stops everything.")
        stop.wait()
    except (RuntimeError, PublishError, httpx.HTTPError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        console.print("stopping…")
        fleet.stop()
