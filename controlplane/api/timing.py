"""Time every API request into a Prometheus histogram, by method, route and status."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.auth.route_index import RouteIndex

#: seconds; API calls are mostly milliseconds, uploads and assignment fan-outs longer
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TimingMiddleware:
    """Observe ``slmfleet_api_request_seconds`` for each HTTP request.

    The route label is the template (``/v1/devices/{device_id}``), never the
    raw path, so label values stay few however many devices there are.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.routes = RouteIndex()
        self.histogram = Histogram(
            "slmfleet_api_request_seconds",
            "API request duration, by method, route template and status code",
            ["method", "route", "status"],
            buckets=BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = self.routes.template(scope) or "unmatched"
            self.histogram.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - start
            )
