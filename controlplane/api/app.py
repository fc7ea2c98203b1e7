"""FastAPI application factory."""

from __future__ import annotations

import logging
from functools import partial

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from controlplane import ui
from controlplane.auth import openapi
from controlplane.auth.bootstrap import bootstrap_admin
from controlplane.auth.middleware import AuthMiddleware
from controlplane.context import AppContext
from controlplane.metrics import build_registry

from . import allow
from .links import add_links
from .pagination import document_page_max
from .routes import (
    artifacts,
    assignments,
    audit,
    blobs,
    credentials,
    devices,
    health,
    inference,
    ingest,
    metrics,
    models,
    rollouts,
    tokens,
    update_policies,
    whoami,
)
from .timing import TimingMiddleware

log = logging.getLogger(__name__)


def _bootstrap(context: AppContext) -> str | None:
    """Create the first admin token on an empty database; the generated one, if any."""
    secret = context.settings.bootstrap_token
    try:
        issued = bootstrap_admin(context.sessions, secret.get_secret_value() if secret else None)
    except SQLAlchemyError as exc:
        # The API still starts, so /healthz can say the database is down.
        log.error("cannot check for API tokens (database unreachable?): %s", exc)
        return None
    return issued.secret if issued and secret is None else None


def create_app(context: AppContext) -> FastAPI:
    """Build the API for ``context``; OpenAPI docs are served at ``/docs``.

    Every route, including any added later with ``include_router``, is behind
    :class:`AuthMiddleware`: the role it needs comes from the method and the
    route template (:mod:`controlplane.auth.policy`), not from the route module.
    """
    app = FastAPI(
        title="slmfleet control plane",
        version="1",
        summary="Devices, signed model releases, artifacts and assignments of an slmfleet fleet.",
    )
    app.state.context = context
    # A registry per app, not prometheus_client's global one, so several apps
    # (tests, replicas in one process) never collide on metric names.
    app.state.metrics_registry = build_registry(context)
    app.state.bootstrap_token = _bootstrap(context)
    # The console's session cookie is a second way in, under the same policy.
    browser = ui.install(app, context)
    app.add_middleware(AuthMiddleware, sessions=context.sessions, browser=browser)
    # Outside the auth check, so its refusals of console pages carry the CSP too.
    app.add_middleware(ui.SecurityHeaders)
    # Added last, so outermost: the time includes the token check.
    app.add_middleware(TimingMiddleware, registry=app.state.metrics_registry)
    openapi.install(app, add_links, partial(document_page_max, cap=context.settings.page_max))
    allow.install(app)
    # In this order: a template declared first wins where two match a path.
    for resource in (health, devices, assignments, models, artifacts, blobs, ingest, metrics,
                     rollouts, inference, tokens, audit, whoami, credentials, update_policies):
        app.include_router(resource.router)
    return app
