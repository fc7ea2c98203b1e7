"""One device: capabilities, telemetry charts, update history, assignment, pinning."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.auth.roles import Role
from controlplane.db import queries
from controlplane.db.history import TimelineKey, current_assignment, device_timeline
from controlplane.db.models import Rollout, RolloutDevice, TelemetryRow
from controlplane.db.statuses import FINISHED_ROLLOUT_STATES
from controlplane.director import UnknownRelease
from controlplane.registry import list_models, list_versions
from protocol import ProtocolError

from ..charts import line_chart
from ..render import can, error_page, render
from ..security import FormRefused, read_form
from .common import Context, DbSession, active_models

router = APIRouter(prefix="/ui/devices", include_in_schema=False)

#: telemetry windows a device page offers, in hours
WINDOWS_H = (1, 6, 24)
#: heartbeats one chart reads at most (a day of 30 s heartbeats)
MAX_HEARTBEATS = 3000
#: history entries shown (the newest of the window)
HISTORY_DAYS = 30
HISTORY_ROWS = 200
#: releases offered in the pin form
PIN_CHOICES = 200


def _weighted(entries: list[dict[str, Any]], key: str) -> float | None:
    """A heartbeat's figure over its model versions, weighted by requests."""
    num = den = 0.0
    for e in entries or ():
        value = e.get(key)
        if isinstance(value, int | float):
            weight = float(e.get("requests") or 1)
            num += value * weight
            den += weight
    return num / den if den else None


def telemetry_series(session: Session, device_id: str, hours: int) -> dict[str, list]:
    """The device's heartbeats over the last ``hours``, as one series per chart."""
    since = time.time() - hours * 3600
    rows = session.execute(
        select(TelemetryRow.ts, TelemetryRow.cpu_percent, TelemetryRow.ram_used_bytes,
               TelemetryRow.temp_c, TelemetryRow.inference)
        .where(TelemetryRow.device_id == device_id, TelemetryRow.ts >= since)
        .order_by(TelemetryRow.ts.desc()).limit(MAX_HEARTBEATS)
    ).all()
    rows = list(reversed(rows))
    series: dict[str, list] = {"cpu": [], "ram": [], "temp": [], "tps": [], "ttft": []}
    for ts, cpu, ram, temp, inference in rows:
        series["cpu"].append((ts, cpu))
        series["ram"].append((ts, ram / 2**20))
        if temp is not None:
            series["temp"].append((ts, temp))
        if (tps := _weighted(inference, "tokens_per_s")) is not None:
            series["tps"].append((ts, tps))
        if (ttft := _weighted(inference, "ttft_p95_ms")) is not None:
            series["ttft"].append((ts, ttft))
    return series


def collapse_progress(entries: list[Any]) -> list[Any]:
    """``entries`` (newest first) with each run of ``downloading`` events cut to its newest:
    a download reports its progress many times, and the history is about what happened."""
    out: list[Any] = []
    for entry in entries:
        if entry.type == "downloading" and out and out[-1].type == "downloading":
            continue
        out.append(entry)
    return out


def memberships(session: Session, device_id: str) -> list[dict[str, Any]]:
    """The device's place in every unfinished rollout: why it waits, if it does."""
    rows = session.execute(
        select(RolloutDevice, Rollout)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(RolloutDevice.device_id == device_id,
               Rollout.state.not_in(list(FINISHED_ROLLOUT_STATES)))
        .order_by(Rollout.created_at.desc()).limit(20)
    ).all()
    return [{"rollout": r.id, "ref": f"{r.model_name}@{r.version}", "rollout_state": r.state,
             "stage": r.stage_index + 1, "state": m.state, "member_stage":
             None if m.stage_index is None else m.stage_index + 1, "reason": m.reason}
            for m, r in rows]


def _releases(session: Session) -> list[str]:
    refs = []
    for model in list_models(session, after=None, limit=50):
        refs += [f"{model.name}@{v.version}"
                 for v in list_versions(session, model.name, after=None, limit=20)]
    return refs[:PIN_CHOICES]


def _device_or_404(request: Request, session: Session, device_id: str) -> Any:
    device = queries.get_device(session, device_id)
    if device is None:
        return None, error_page(request, 404, "No such device", "unknown_device",
                                f"no device {device_id!r}")
    return device, None


@router.get("/{device_id}", response_class=HTMLResponse)
def device_page(device_id: str, request: Request, session: DbSession) -> HTMLResponse:
    """Everything the control plane knows about one device."""
    device, missing = _device_or_404(request, session, device_id)
    if missing:
        return missing
    try:
        hours = int(request.query_params.get("hours", "6"))
    except ValueError:
        hours = 6
    hours = hours if hours in WINDOWS_H else 6
    series = telemetry_series(session, device_id, hours)
    charts = [
        line_chart("CPU", "%", series["cpu"]),
        line_chart("RAM used", "MiB", series["ram"]),
        line_chart("Temperature", "°C", series["temp"]),
        line_chart("Tokens per second", "tokens/s", series["tps"]),
        line_chart("Time to first token, p95", "ms", series["ttft"]),
    ]
    window = TimelineKey(time.time() - HISTORY_DAYS * 86400, 0, 0)
    history = device_timeline(session, device_id, after=window, limit=HISTORY_ROWS * 4)
    return render(
        request, "device.html", title=f"Device {device.id}", device=device,
        models=active_models(device.models or device.active_model),
        labels=sorted((device.labels or {}).items()),
        caps=device.latest_capabilities or {}, runtimes=device.latest_runtimes or [],
        charts=charts, hours=hours, windows=WINDOWS_H,
        history=collapse_progress(history[::-1])[:HISTORY_ROWS],
        live=current_assignment(session, device_id), update=device.update_status,
        memberships=memberships(session, device_id),
        releases=_releases(session) if can(request, Role.OPERATOR) else [],
    )


@router.get("/{device_id}/pin", response_class=HTMLResponse)
def confirm_pin(device_id: str, request: Request, session: DbSession) -> HTMLResponse:
    """Ask before pinning: names the device and the release it will be sent."""
    device, missing = _device_or_404(request, session, device_id)
    if missing:
        return missing
    ref = request.query_params.get("release", "")
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        return error_page(request, 400, "Pick a release", "bad_release",
                          "choose a release as name@version")
    return render(request, "confirm.html", title=f"Pin {device.id}", action=request.url.path,
                  question=f"Pin device {device.id} to {name}@{version}?",
                  detail="The director signs an assignment for this one device, outside any "
                         "rollout; it replaces the device's current assignment.",
                  fields={"release": ref}, button=f"Pin {device.id} to {ref}",
                  back=f"/ui/devices/{device.id}")


@router.post("/{device_id}/pin", response_class=HTMLResponse)
async def pin(device_id: str, request: Request, context: Context) -> HTMLResponse:
    """Pin the device to the release, as ``POST /v1/devices/{id}/assignment`` does."""
    form = await read_form(request)
    name, sep, version = form.get("release", "").partition("@")
    if not sep or not name or not version:
        raise FormRefused(400, "bad_release", "choose a release as name@version")
    if context.director is None:
        raise FormRefused(404, "director_off", "assignments are off: this control plane has "
                                               "no director key (docs/models.md)")
    try:
        result = context.director.assign([device_id], name, version)[0]
    except UnknownRelease as exc:
        raise FormRefused(404, "unknown_release", str(exc)) from exc
    except ProtocolError as exc:
        raise FormRefused(409, exc.reason, str(exc)) from exc
    if result.status != "assigned":
        raise FormRefused(409 if result.status == "incompatible" else 404, result.status,
                          f"{device_id}: {result.status}"
                          + (f" ({result.reason})" if result.reason else ""))
    return RedirectResponse(f"/ui/devices/{device_id}?done=pinned", status_code=303)
