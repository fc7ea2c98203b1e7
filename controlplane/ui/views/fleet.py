"""The fleet page: devices with their tier, profile, liveness, models and labels."""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from controlplane.db import queries
from protocol import Tier

from ..render import error_page, render
from .common import DbSession, active_models, page_size

router = APIRouter(prefix="/ui", include_in_schema=False)

ONLINE_CHOICES = {"": None, "yes": True, "no": False}


class FilterError(ValueError):
    """A filter the fleet page cannot apply; the message names it."""


def parse_filters(params: dict[str, str]) -> tuple[queries.DeviceFilter, dict[str, str]]:
    """The device filter the query string asks for, and the values to put back in the form."""
    tier = params.get("tier", "")
    if tier and tier not in {t.value for t in Tier}:
        raise FilterError(f"tier must be one of {', '.join(t.value for t in Tier)}")
    online = params.get("online", "")
    if online not in ONLINE_CHOICES:
        raise FilterError("online must be yes, no or empty")
    label = params.get("label", "").strip()
    labels: tuple[tuple[str, str], ...] = ()
    if label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise FilterError("a label filter looks like key=value")
        labels = ((key, value),)
    profile = params.get("profile", "").strip()
    flt = queries.DeviceFilter(tier=tier or None, profile=profile or None,
                               online=ONLINE_CHOICES[online], labels=labels)
    return flt, {"tier": tier, "online": online, "label": label, "profile": profile}


@router.get("", include_in_schema=False)
def root() -> RedirectResponse:
    """``/ui`` is ``/ui/``."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, session: DbSession) -> HTMLResponse:
    """Counts per tier and state, then one page of devices matching the filters."""
    params = dict(request.query_params)
    try:
        flt, shown = parse_filters(params)
    except FilterError as exc:
        return error_page(request, 400, "Bad filter", "bad_filter", str(exc))
    limit = page_size(params.get("limit"))
    after = params.get("after") or None
    rows = queries.list_devices(session, flt, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    counts: Counter[tuple[str, str]] = Counter()
    tiers: Counter[str] = Counter()
    for tier, online, n in queries.count_devices_by_tier_and_state(session):
        counts[(tier or "unknown", "online" if online else "offline")] += n
        tiers[tier or "unknown"] += n
    next_url = None
    if more:
        next_url = "/ui/?" + urlencode({**{k: v for k, v in shown.items() if v},
                                         "after": rows[-1].id, "limit": limit})
    devices = [
        {"id": d.id, "tier": d.tier, "profile": d.profile, "online": d.online,
         # hello/2 reports every model by name; hello/1 its one active model
         "models": active_models(d.models or d.active_model),
         "labels": sorted((d.labels or {}).items()),
         "last_seen": d.last_seen, "simulated": d.simulated}
        for d in rows
    ]
    template = "fleet_rows.html" if request.headers.get("hx-request") else "fleet.html"
    return render(request, template, title="Fleet", devices=devices, shown=shown,
                  tiers=sorted(tiers.items()), counts=counts, total=sum(tiers.values()),
                  tier_choices=[t.value for t in Tier], next_url=next_url,
                  first_page=after is None)
