"""The update pipeline's health check, run in the worker that will serve the model."""

from __future__ import annotations

import asyncio

from ..inference.adapters import check_staged_adapter
from ..inference.runtime import InferenceRuntime, PrepareAborted
from ..inference.spec import ModelSpec
from ..profiles import RuntimeSettings
from . import HealthAborted, HealthChecker, HealthRequest, HealthResult


class WorkerHealthChecker(HealthChecker):
    """Loads the staged model as a warm candidate and checks it there.

    A model that passes stays loaded beside the serving one, so activating
    it moves traffic without a cold start (:meth:`InferenceRuntime.activated`).
    """

    def __init__(self, runtime: InferenceRuntime, profile: RuntimeSettings,
                 timeout_s: float) -> None:
        self.runtime, self.profile, self.timeout_s = runtime, profile, timeout_s

    async def check(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        """See :meth:`HealthChecker.check`."""
        if request.adapter_of is not None:
            return await check_staged_adapter(self.runtime, request, abort, self.timeout_s)
        spec = ModelSpec(
            key=request.key or request.model.parent.name,
            name=request.name or "model",
            version=request.version or "0",
            format=request.format,
            path=request.model,
            runtime=request.runtime,
            sha256=request.sha256 or "",
        )
        try:
            result = await self.runtime.prepare(
                spec, request.spec.model_dump(mode="json"), abort, self.timeout_s
            )
        except PrepareAborted as exc:
            raise HealthAborted(str(exc)) from exc
        details = {k: v for k, v in result.items() if k not in ("passed", "reasons")}
        return HealthResult(bool(result.get("passed")), list(result.get("reasons", [])), details)
