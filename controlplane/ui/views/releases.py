"""Models and releases: versions, variants per tier, signatures; starting a rollout."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.db.models import Rollout
from controlplane.registry import get_version, list_models, list_versions, variants_of
from controlplane.rollouts import RolloutSpec, store
from protocol import Tier

from ..render import error_page, render
from ..security import FormRefused, read_form
from .common import Context, DbSession

router = APIRouter(prefix="/ui/models", include_in_schema=False)

MODELS_SHOWN = 100
VERSIONS_SHOWN = 20
#: what the start form fills in; the same defaults as a spec file's
FORM_DEFAULTS = {"stages": "10, 100", "bake_s": "300", "target": "all", "on_failure": "rollback",
                 "min_devices_reporting": "1", "max_failed": "0", "min_health_pass_rate": "1",
                 "max_concurrent_downloads": ""}


@router.get("", response_class=HTMLResponse)
def models_page(request: Request, session: DbSession) -> HTMLResponse:
    """Every model with its newest versions."""
    models = [(m, list_versions(session, m.name, after=None, limit=VERSIONS_SHOWN))
              for m in list_models(session, after=None, limit=MODELS_SHOWN)]
    return render(request, "models.html", title="Models and releases", models=models)


def _number(form: dict[str, str], key: str, kind: type = float) -> Any:
    raw = form.get(key, "").strip()
    if raw == "":
        return None
    try:
        return kind(raw)
    except ValueError as exc:
        raise FormRefused(400, "bad_spec", f"{key}: {raw!r} is not a number") from exc


def spec_from_form(name: str, version: str, form: dict[str, str]) -> RolloutSpec:
    """The rollout spec the start form describes; a 400 naming the field that is wrong."""
    try:
        percents = [float(p) for p in form.get("stages", "").replace(";", ",").split(",")
                    if p.strip()]
    except ValueError as exc:
        raise FormRefused(400, "bad_spec", "stages: percentages separated by commas, "
                                           "e.g. 10, 100") from exc
    bake = _number(form, "bake_s")
    target_raw = form.get("target", "all")
    if target_raw != "all" and target_raw not in {t.value for t in Tier}:
        raise FormRefused(400, "bad_spec", "target: all or one tier")
    gates = {key: value for key, kind in (("min_devices_reporting", int), ("max_failed", int),
                                          ("min_health_pass_rate", float))
             if (value := _number(form, key, kind)) is not None}
    raw = {
        "model": name, "version": version,
        "target": {"all": True} if target_raw == "all" else {"tiers": [target_raw]},
        "stages": [{"percent": p, **({"bake_s": bake} if bake is not None else {})}
                   for p in percents],
        "gates": gates, "on_failure": form.get("on_failure", "rollback"),
        "max_concurrent_downloads": _number(form, "max_concurrent_downloads", int),
    }
    try:
        return RolloutSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise FormRefused(400, "bad_spec", f"{where}: {first['msg']}") from exc


def _release(request: Request, session: Session, name: str, version: str) -> Any:
    row = get_version(session, name, version)
    if row is None:
        return None, error_page(request, 404, "No such release", "unknown_release",
                                f"{name}@{version} is not registered")
    return row, None


@router.get("/{name}/{version}", response_class=HTMLResponse)
def release_page(name: str, version: str, request: Request, session: DbSession,
                 context: Context) -> HTMLResponse:
    """One release: variants per tier, signatures and who signed, its rollouts."""
    row, missing = _release(request, session, name, version)
    if missing:
        return missing
    envelope = json.loads(row.envelope)
    manifest_variants = envelope["signed"].get("variants", {})
    pinned = context.trust.release_keys
    signatures = [{"keyid": s.get("keyid", "?"),
                   "pinned": pinned is not None and s.get("keyid") in pinned.keys}
                  for s in envelope.get("signatures", [])]
    variants = [{"row": v, "manifest": manifest_variants.get(v.tier, {})}
                for v in variants_of(session, row.id)]
    rollouts = session.scalars(
        select(Rollout).where(Rollout.model_name == name, Rollout.version == version)
        .order_by(Rollout.created_at.desc()).limit(20)).all()
    return render(request, "release.html", title=f"Release {name}@{version}", release=row,
                  variants=variants, signatures=signatures, rollouts=rollouts,
                  threshold=pinned.threshold if pinned else None, form=FORM_DEFAULTS,
                  tiers=[t.value for t in Tier])


def _describe(spec: RolloutSpec) -> str:
    stages = ", then ".join(f"{s.percent:g} % (bake {s.bake_s:g} s)" for s in spec.stages)
    target = "every device" if spec.target.all else "tier " + ", ".join(
        t.value for t in spec.target.tiers)
    return (f"Targets {target}; stages {stages}; on a failed gate: {spec.on_failure}. "
            f"Gates: {spec.gates.model_dump(exclude_none=True)}.")


@router.get("/{name}/{version}/rollout", response_class=HTMLResponse)
def confirm_rollout(name: str, version: str, request: Request,
                    session: DbSession) -> HTMLResponse:
    """The rollout the form describes, in words, with the button that starts it."""
    _, missing = _release(request, session, name, version)
    if missing:
        return missing
    form = {k: request.query_params.get(k, v) for k, v in FORM_DEFAULTS.items()}
    spec = spec_from_form(name, version, form)
    return render(request, "confirm.html", title=f"Roll out {name}@{version}",
                  action=request.url.path, question=f"Start a rollout of {name}@{version}?",
                  detail=_describe(spec), fields=form,
                  button=f"Start rollout of {name}@{version}",
                  back=f"/ui/models/{name}/{version}")


@router.post("/{name}/{version}/rollout", response_class=HTMLResponse)
async def start_rollout(name: str, version: str, request: Request,
                        context: Context) -> RedirectResponse:
    """Create the rollout, as ``POST /v1/rollouts`` does; the engine takes it from there."""
    form = await read_form(request)
    spec = spec_from_form(name, version, form)
    if context.director is None:
        raise FormRefused(404, "director_off", "rollouts are off: this control plane has no "
                                               "director key (docs/models.md)")
    try:
        rollout_id = store.create(context.engine, spec)
    except store.UnknownVersion as exc:
        raise FormRefused(404, "unknown_release", str(exc)) from exc
    context.kick_rollouts()
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)
