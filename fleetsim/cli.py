"""``slmfleet simulate``: a fleet of simulated devices against a real broker."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

console = Console(stderr=True)


def _trust(release_keys: Path | None, director_keys: Path | None) -> object | None:
    from agent.trust import TrustRoots
    from protocol import ProtocolError, verify_pinned_key_list

    if release_keys is None and director_keys is None:
        return None
    if release_keys is None or director_keys is None:
        raise typer.BadParameter("pass both --release-keys and --director-keys, or neither")
    lists = []
    for path, role in ((release_keys, "release"), (director_keys, "director")):
        try:
            lists.append(verify_pinned_key_list(path.read_bytes(), role))  # type: ignore[arg-type]
        except (OSError, ProtocolError) as exc:
            raise typer.BadParameter(f"{path}: {exc}") from exc
    return TrustRoots(release=lists[0], director=lists[1])


def _table(sim: object) -> Table:
    from . import FleetSimulator

    assert isinstance(sim, FleetSimulator)
    snap = sim.stats.snapshot()
    table = Table(title=f"simulated fleet: {len(sim.devices)} devices, "
                        f"{snap['elapsed_s']} s, {snap['published_per_s']} msg/s out")
    table.add_column("what")
    table.add_column("count", justify="right")
    tiers: dict[str, int] = {}
    for d in sim.devices:
        tiers[d.tier.value] = tiers.get(d.tier.value, 0) + 1
    rows = [(f"tier {k}", v) for k, v in sorted(tiers.items())]
    rows += [(f"published {k}", v) for k, v in sorted(snap["published"].items())]  # type: ignore[union-attr]
    rows += [(f"update {k}", v) for k, v in sorted(sim.states().items())]
    rows += [(f"active {k}", v) for k, v in sorted(sim.active_versions().items())]
    rows.append(("publish errors", snap["publish_errors"]))  # type: ignore[arg-type]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _part_options(**given: object) -> list[str]:
    """The options a part is started with: those given, in ``--name value`` form."""
    out: list[str] = []
    for name, value in given.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def simulate(
    broker: str = typer.Option("mqtt://127.0.0.1:1883", help="broker URL"),
    username: str = typer.Option(..., envvar="SLMFLEET_SIM_USERNAME",
                                 help="broker user allowed on every device's topics"),
    password: str = typer.Option(..., envvar="SLMFLEET_SIM_PASSWORD", help="its password"),
    scenario: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                         help="scenario YAML (examples/fleet.scenario.yaml)"),
    devices: int | None = typer.Option(None, help="number of devices (overrides the scenario)"),
    heartbeat: float | None = typer.Option(None, help="telemetry period, s (overrides)"),
    ramp: float | None = typer.Option(None, help="spread hellos over this many s (overrides)"),
    release_keys: Path | None = typer.Option(None, help="pinned release key list (JSON)"),
    director_keys: Path | None = typer.Option(None, help="pinned director key list (JSON)"),
    connections: int | None = typer.Option(None, min=1, max=64,
                                           help="MQTT connections shared by the devices"),
    duration: float = typer.Option(0.0, min=0.0, help="stop after this many s (0: Ctrl-C)"),
    output: str = typer.Option("table", help="`table` (live) or `json` (a summary at the end)"),
    procs: int = typer.Option(1, min=1, max=32,
                              help="processes sharing the devices (needs --output json)"),
    catch_up: int = typer.Option(0, min=0, help="heartbeat periods a late tick still sends "
                                 "(0: one beat after a stall, as an agent does)"),
    part: str = typer.Option("0/1", hidden=True, help="k/n: this process's share (--procs)"),
) -> None:
    """Simulate a fleet of devices against a real broker and control plane."""
    from agent.profiles import default_profiles_dir, load_profiles

    from . import FleetSimulator, load_scenario
    from .procs import parse_part, run_parts

    try:
        spec = load_scenario(scenario, devices=devices, heartbeat_s=heartbeat, ramp_s=ramp)
        share = parse_part(part)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if procs > 1:
        if output != "json":
            raise typer.BadParameter("--procs above 1 needs --output json")
        options = _part_options(broker=broker, username=username, scenario=scenario,
                                devices=devices, heartbeat=heartbeat, ramp=ramp,
                                release_keys=release_keys, director_keys=director_keys,
                                connections=connections, duration=duration, catch_up=catch_up)
        try:
            typer.echo(json.dumps(run_parts(options, procs, password)))
        except RuntimeError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sim = FleetSimulator(spec, broker, username, password,
                         trust=_trust(release_keys, director_keys),  # type: ignore[arg-type]
                         profiles=load_profiles(default_profiles_dir()), connections=connections,
                         catch_up=catch_up, part=share)
    done = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        sim.start()
    except ConnectionError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    deadline = time.monotonic() + duration if duration else None
    try:
        if output == "json":
            done.wait(duration or None)
        else:
            with Live(_table(sim), console=Console(), refresh_per_second=2) as live:
                while not done.wait(0.5):
                    live.update(_table(sim))
                    if deadline is not None and time.monotonic() >= deadline:
                        break
    finally:
        sim.stop()
    if output == "json":
        typer.echo(json.dumps({**sim.stats.snapshot(), "devices": len(sim.devices),
                               "states": dict(sim.states()),
                               "active": dict(sim.active_versions())}))
