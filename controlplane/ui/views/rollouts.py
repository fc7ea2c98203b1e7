"""Rollouts: their stages, cohort progress, gates against thresholds, and the levers.

A rollout's page follows it live: ``/ui/rollouts/{id}/live`` is a stream of
server-sent events, each the progress section rendered again (and escaped)
on the server whenever it changes; ``static/console.js`` swaps it in.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from markupsafe import Markup
from sqlalchemy.orm import Session

from controlplane.api.routes.rollouts import get_rollout
from controlplane.api.schemas_rollouts import RolloutDetail
from controlplane.auth.roles import Role
from controlplane.auth.tokens import get_token, is_active
from controlplane.db.statuses import FINISHED_ROLLOUT_STATES, OUT_OF_ROLLOUT
from controlplane.rollouts import store
from controlplane.rollouts.cohort import stage_size

from ..charts import GateBar, gate_chart, progress_bar
from ..render import can, error_page, fragment, principal_of, render
from ..security import FormRefused, console_session, read_form
from .common import Context, DbSession, page_size

router = APIRouter(prefix="/ui/rollouts", include_in_schema=False)

#: what each lever does, said on its confirmation
ACTIONS: dict[str, str] = {
    "pause": "No new devices are assigned until it is resumed; devices already updating finish.",
    "resume": "The rollout goes on from the stage it was paused in.",
    "approve": "The next stage starts: its devices are assigned the release.",
    "abort": "The rollout stops where it is: devices keep what they run now, no one is sent back.",
    "rollback": "Every device that received this release is sent back to the version it ran "
                "before.",
}
#: the levers offered in each state (the store refuses the rest with a 409)
OFFERED: dict[str, tuple[str, ...]] = {
    "active": ("pause", "abort", "rollback"),
    "awaiting_approval": ("approve", "pause", "abort", "rollback"),
    "paused": ("resume", "abort", "rollback"),
    "completed": ("rollback",),
}
#: how often the live stream looks, and for how long one stream lasts
#: (the browser reconnects by itself, and the session is checked again then)
LIVE_POLL_S = 1.0
LIVE_MAX_S = 300.0


def progress(detail: RolloutDetail) -> dict[str, Any]:
    """Cohort progress of each stage and overall, and the gates as charts."""
    out_of = {s.value for s in OUT_OF_ROLLOUT}
    eligible = sum(n for state, n in detail.counts.items() if state not in out_of)
    stages = []
    for stage in detail.per_stage:
        planned = stage_size(stage.percent, eligible) if eligible else 0
        done = sum(n for s, n in stage.devices.items() if s in ("succeeded",))
        # Devices of earlier stages count towards this one's cumulative share.
        earlier = sum(n for st in detail.per_stage if st.index < stage.index
                      for s, n in st.devices.items() if s == "succeeded")
        stages.append({"stage": stage, "planned": planned,
                       "bar": progress_bar(min(planned, done + earlier), planned,
                                           f"stage {stage.index}")})
    updated = detail.counts.get("succeeded", 0)
    gates = [GateBar(g.get("gate", "?"), g.get("verdict", "?"), g.get("measured"),
                     g.get("threshold"), g.get("tier"), g.get("note", "")) for g in detail.gates]
    failed = next((d for d in reversed(detail.timeline) if d.kind == "gate_failed"), None)
    failed_gates = [GateBar(g.get("gate", "?"), g.get("verdict", "?"), g.get("measured"),
                            g.get("threshold"), g.get("tier"), g.get("note", ""))
                    for g in ((failed.details or {}).get("gates") or [] if failed else [])]
    return {
        "detail": detail, "stages": stages, "eligible": eligible, "updated": updated,
        "overall": progress_bar(updated, eligible, "devices updated"),
        # The latest evaluation is shown apart only when it is not the failed one.
        "gates": [(g, gate_chart(g)) for g in gates] if gates != failed_gates else [],
        "failed": failed, "failed_gates": [(g, gate_chart(g)) for g in failed_gates],
        "finished": detail.state in FINISHED_ROLLOUT_STATES,
        "offered": OFFERED.get(detail.state, ()),
    }


def _detail(session: Session, rollout_id: str) -> RolloutDetail | None:
    try:
        return get_rollout(rollout_id, session)
    except HTTPException:
        return None


@router.get("", response_class=HTMLResponse)
def rollouts_page(request: Request, session: DbSession) -> HTMLResponse:
    """Rollouts, newest first."""
    limit = page_size(request.query_params.get("limit"))
    after = request.query_params.get("after") or None
    try:
        rows = store.list_rollouts(session, after=after, limit=limit + 1)
    except ValueError:
        return error_page(request, 400, "Bad page", "bad_cursor",
                          "the page link is not one this console made")
    more = len(rows) > limit
    rows = rows[:limit]
    next_after = f"{rows[-1].created_at!r} {rows[-1].id}" if more else None
    return render(request, "rollouts.html", title="Rollouts", rollouts=rows,
                  next_after=next_after, limit=limit)


@router.get("/{rollout_id}", response_class=HTMLResponse)
def rollout_page(rollout_id: str, request: Request, session: DbSession) -> HTMLResponse:
    """One rollout; its progress section follows it live."""
    detail = _detail(session, rollout_id)
    if detail is None:
        return error_page(request, 404, "No such rollout", "unknown_rollout",
                          f"no rollout {rollout_id!r}")
    values = progress(detail)
    html = live_part(values, can(request, Role.OPERATOR))
    return render(request, "rollout.html", title=f"Rollout {detail.id}",
                  done=request.query_params.get("done"), live_html=Markup(html),
                  live_digest=digest(html), **values)


def live_part(values: dict[str, Any], operator: bool) -> str:
    """The part of a rollout's page that follows it: actions, progress, timeline, devices."""
    return fragment("rollout_live.html", operator=operator, **values)


def digest(html: str) -> str:
    """A short fingerprint of a live part: the stream sends only what the page lacks."""
    return hashlib.sha256(html.encode()).hexdigest()[:16]


def _event(name: str, html: str) -> str:
    # Each line of the fragment is its own data: line; the browser joins them.
    data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
    return f"event: {name}\n{data}\n\n"


@router.get("/{rollout_id}/live")
async def live(rollout_id: str, request: Request, context: Context) -> StreamingResponse:
    """Server-sent events: the rollout's live part each time it changes, ``done`` at the end.

    The actions in it are the ones offered now; a role that may not act sees none.
    """
    operator = can(request, Role.OPERATOR)
    who, signed_in = principal_of(request), console_session(request)
    store = request.app.state.console_sessions

    def look() -> tuple[str, str]:
        """The event to send now, and its HTML."""
        with context.sessions() as session:
            # Checked on every look, not only when the stream opened: a sign-out or a
            # revoked token stops the stream within a second.
            token = get_token(session, who.token_id) if who else None
            if (token is None or not is_active(token, time.time())
                    or (signed_in is not None and store.get(signed_in.id) is None)):
                return "done", "<p class=error>Signed out: reload the page to sign in.</p>"
            detail = _detail(session, rollout_id)
            if detail is None:
                return "done", "<p class=error>This rollout no longer exists.</p>"
            values = progress(detail)
            return ("done" if values["finished"] else "progress"), live_part(values, operator)

    async def events() -> AsyncIterator[str]:
        # What the page already shows: a reconnect or a fresh page gets no repeat,
        # and a person using the keyboard keeps their place.
        last = request.query_params.get("since")
        deadline = time.monotonic() + LIVE_MAX_S
        # Tells the browser how long to wait before reconnecting after the stream ends.
        yield "retry: 2000\n\n"
        while time.monotonic() < deadline and not await request.is_disconnected():
            kind, html = await to_thread.run_sync(look)
            if kind == "done":
                yield _event(kind, html)
                return
            if digest(html) != last:
                last = digest(html)
                yield _event(kind, html)
            await asyncio.sleep(LIVE_POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


def _action(action: str) -> str:
    if action not in ACTIONS:
        raise FormRefused(404, "unknown_action", f"no action {action!r}: one of "
                                                 + ", ".join(ACTIONS))
    return action


@router.get("/{rollout_id}/act/{action}", response_class=HTMLResponse)
def confirm_action(rollout_id: str, action: str, request: Request,
                   session: DbSession) -> HTMLResponse:
    """Ask before acting: names the rollout, the release and what the action does."""
    _action(action)
    detail = _detail(session, rollout_id)
    if detail is None:
        return error_page(request, 404, "No such rollout", "unknown_rollout",
                          f"no rollout {rollout_id!r}")
    ref = f"{detail.model}@{detail.version}"
    return render(request, "confirm.html", title=f"{action.capitalize()} rollout {detail.id}",
                  action=request.url.path, question=f"{action.capitalize()} the rollout of "
                  f"{ref} ({detail.id}, now {detail.state})?", detail=ACTIONS[action],
                  fields={}, reason=True, button=f"{action.capitalize()} rollout of {ref}",
                  danger=action in ("abort", "rollback"), back=f"/ui/rollouts/{detail.id}")


@router.post("/{rollout_id}/act/{action}", response_class=HTMLResponse)
async def act(rollout_id: str, action: str, request: Request,
              context: Context) -> RedirectResponse:
    """Pause, resume, approve, abort or roll back, as ``POST /v1/rollouts/{id}/{action}``."""
    form = await read_form(request)
    _action(action)
    reason = form.get("reason", "").strip()[:1024] or None
    try:
        await to_thread.run_sync(
            lambda: store.act(context.engine, rollout_id, action, reason=reason))
    except store.UnknownRollout as exc:
        raise FormRefused(404, "unknown_rollout", str(exc)) from exc
    except store.RolloutConflict as exc:
        raise FormRefused(409, "conflict", str(exc)) from exc
    context.kick_rollouts()
    return RedirectResponse(f"/ui/rollouts/{rollout_id}?done={action}", status_code=303)
