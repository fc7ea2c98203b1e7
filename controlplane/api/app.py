"""FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from controlplane.context import AppContext
from controlplane.metrics import build_registry

from .routes import artifacts, assignments, devices, health, ingest, metrics, models


def create_app(context: AppContext) -> FastAPI:
    """Build the API for ``context``; OpenAPI docs are served at ``/docs``."""
    app = FastAPI(
        title="slmfleet control plane",
        version="1",
        summary="Devices, signed model releases, artifacts and assignments of an slmfleet fleet.",
    )
    app.state.context = context
    # A registry per app, not prometheus_client's global one, so several apps
    # (tests, replicas in one process) never collide on metric names.
    app.state.metrics_registry = build_registry(context)
    app.include_router(health.router)
    app.include_router(devices.router)
    app.include_router(assignments.router)
    app.include_router(models.router)
    app.include_router(artifacts.router)
    app.include_router(ingest.router)
    app.include_router(metrics.router)
    return app
