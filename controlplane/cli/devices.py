"""``slmfleet devices``: list and inspect the device registry."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from .options import Api, api_command
from .output import emit_json, titled_table, when

app = typer.Typer(help="Devices: list, show, assign, unassign, enroll, revoke.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Devices: list, show, assign and unassign models, enroll (MQTT credentials), revoke."""



def _active(d: dict[str, Any]) -> str:
    """Every active model as ``name@version``, by name."""
    models = d.get("models") or {}
    refs = [f"{name}@{m.get('version')}" for name, m in sorted(models.items())
            if m.get("version")]
    return ", ".join(refs) or "-"


def _form(d: dict[str, Any]) -> str:
    # "single" is the old form: say what it means for the operator.
    return "set" if d.get("assignment_form") == "set" else "single (old agent)"


def _labels(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items()))


def device_table(devices: list[dict[str, Any]]) -> Table:
    """A table of devices as ``GET /v1/devices`` lists them."""
    table = titled_table(
        "devices", "device", "tier", "profile", "online", "last seen", "labels", "active models",
        "form",
    )
    for d in devices:
        table.add_row(
            d["id"], d.get("tier") or "?", d.get("profile") or "?",
            "yes" if d.get("online") else "no", when(d.get("last_seen"), seconds=True),
            _labels(d),
            _active(d),
            _form(d),
        )
    return table


@api_command(app, "list")
def list_(
    api: Api,
    tier: str | None = typer.Option(None, "--tier", help="micro, small or medium"),
    profile: str | None = typer.Option(None, "--profile", help="firmware profile name"),
    online: bool | None = typer.Option(None, "--online/--offline", help="only online / offline"),
    label: list[str] = typer.Option([], "--label", help="key=value; repeat, all must match"),
    form: str | None = typer.Option(
        None, "--form", help="single: agents that read one model (to upgrade); set"),
) -> None:
    """Devices matching every filter, by id."""
    params: dict[str, Any] = {"tier": tier, "profile": profile, "label": label or None,
                              "assignment_form": form}
    if online is not None:
        params["online"] = "true" if online else "false"
    devices = api.list("/v1/devices", **params)
    api.emit(devices, device_table(devices))


def device_detail(d: dict[str, Any]) -> Table:
    """A two-column table of one device as ``GET /v1/devices/{id}`` shows it."""
    table = titled_table(d["id"], "field", "value", show_header=False)
    caps = d.get("capabilities") or {}
    update = d.get("update") or {}
    assignment = d.get("assignment") or {}
    rows = [
        ("tier", d.get("tier") or "?"),
        ("profile", d.get("profile") or "?"),
        ("agent", d.get("agent_version") or "?"),
        ("online", "yes" if d.get("online") else "no"),
        ("first seen", when(d.get("first_seen"), seconds=True)),
        ("last seen", when(d.get("last_seen"), seconds=True)),
        ("labels", _labels(d)),
        ("RAM", f"{caps['ram_bytes'] / 2**30:.1f} GiB" if caps.get("ram_bytes") else "?"),
        ("assignment form", _form(d)),
        ("update", f"{update.get('state', '-')} {update.get('reason') or ''}".strip()),
        ("assignment", f"{assignment.get('ref', '-')}" if assignment else "-"),
        ("recent telemetry", str(len(d.get("recent_telemetry") or []))),
    ]
    for name, m in sorted((d.get("models") or {}).items()):
        assigned = (m.get("assignment") or {}).get("ref") or "-"
        rows.append((f"model {name}", f"{m.get('version') or '-'} ({m.get('state')}), "
                                      f"assigned {assigned}, tier {m.get('tier') or '?'}"
                                      f"{_model_notes(m)}"))
    for w in d.get("waiting") or []:
        until = f" until {when(w['until'], seconds=True)}" if w.get("until") else ""
        rows.append((f"waiting {w['model']}", f"{w['type']}{until}: {w.get('reason') or ''}"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _model_notes(m: dict[str, Any]) -> str:
    """What a model's row adds: its last update's bytes, and why it is not served."""
    update = m.get("update") or {}
    notes = ""
    if (moved := update.get("downloaded_bytes")) is not None:
        notes += f", downloaded {_size(moved)}"
    if m.get("state") == "inactive":
        notes += f": {m.get('reason') or 'not served'}"
    return notes


def _size(nbytes: int) -> str:
    """``nbytes`` for people: bytes, KiB or MiB."""
    if nbytes < 1024:
        return f"{nbytes} B"
    if nbytes < 1 << 20:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


@api_command(app)
def show(api: Api, device_id: str = typer.Argument(..., help="device id")) -> None:
    """One device: identity, liveness, capabilities, update state and assignment."""
    d = api.call(lambda client: client.get(f"/v1/devices/{quote(device_id, safe='')}"))
    api.emit(d, device_detail(d))


def _assignment_path(device_id: str, model: str | None = None) -> str:
    path = f"/v1/devices/{quote(device_id, safe='')}/assignment"
    return path if model is None else f"{path}/{quote(model, safe='')}"


@api_command(app)
def assign(
    api: Api,
    device_id: str = typer.Argument(..., help="device id"),
    model: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="release version"),
) -> None:
    """Pin the device's model MODEL to MODEL@VERSION; its other models stay as they are."""
    body = {"model": model, "version": version}
    done = api.call(lambda client: client.post(_assignment_path(device_id), body))
    result = done["results"][0]
    if api.json:
        emit_json(done)
        return
    typer.echo(f"assigned {model}@{version} to {device_id} ({result['tier']}, "
               f"sequence {result['sequence']})")


@api_command(app, output=False)
def unassign(
    api: Api,
    device_id: str = typer.Argument(..., help="device id"),
    model: str = typer.Argument(..., help="the model name to take off the device"),
) -> None:
    """Take MODEL off the device: its next document leaves it out (admin)."""
    done = api.call(
        lambda client: client.request("DELETE", _assignment_path(device_id, model)).json())
    typer.echo(f"took {model} off {device_id} (sequence {done['sequence']})")


@api_command(app, "override-lock")
def override_lock(
    api: Api,
    device_id: str = typer.Argument(..., help="device id"),
    model: str = typer.Argument(..., help="the model whose activation the locks defer"),
    reason: str = typer.Option(..., "--reason", help="why; kept in the signed entry"),
) -> None:
    """Override the device's update locks for MODEL: locks taken before now no longer
    defer its activation (signed into the device's entry; audited)."""
    path = f"/v1/devices/{quote(device_id, safe='')}/lock-override"
    done = api.call(lambda client: client.post(path, {"model": model, "reason": reason}))
    if api.json:
        emit_json(done)
        return
    typer.echo(f"override {done['override_id']} signed into {device_id}'s {model} entry "
               f"(sequence {done['sequence']})")


@api_command(app)
def enroll(
    api: Api, device_id: str = typer.Argument(..., help="device id: becomes its MQTT username")
) -> None:
    """Issue the device its own MQTT password (admin). Shown once: put it in agent.toml."""
    path = f"/v1/devices/{quote(device_id, safe='')}/credentials"
    done = api.call(lambda client: client.post(path))
    if api.json:
        emit_json(done)
        return
    typer.echo(f"enrolled {done['device_id']}; in its agent.toml:")
    typer.echo(f'device_id = "{done["device_id"]}"')
    typer.echo(f'broker_url = "{done["broker_url"]}"')
    typer.echo(f'password = "{done["password"]}"')
    if not done["broker_reloaded"]:
        typer.echo("note: the broker was not reloaded; it applies at its next start", err=True)


@api_command(app, output=False)
def revoke(api: Api, device_id: str = typer.Argument(..., help="device id")) -> None:
    """Revoke the device's MQTT credentials (admin): the broker refuses it from now on."""
    path = f"/v1/devices/{quote(device_id, safe='')}/credentials"
    api.call(lambda client: client.request("DELETE", path))
    typer.echo(f"revoked the MQTT credentials of {device_id}")
