"""The update pipeline's health check, run in the worker that will serve the model."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..inference.adapters import adapter_cache_key, check_staged_adapter
from ..inference.runtime import InferenceRuntime, PrepareAborted
from ..inference.spec import ModelSpec
from ..inference.supervisor import RemoteError
from ..profiles import RuntimeSettings
from . import HealthAborted, HealthChecker, HealthRequest, HealthResult
from .eval_cache import EvalCache
from .evaluation import chat_request, score_model

log = logging.getLogger(__name__)


class WorkerHealthChecker(HealthChecker):
    """Loads the staged model as a warm candidate and checks it there.

    A model that passes stays loaded beside the serving one, so activating
    it moves traffic without a cold start (:meth:`InferenceRuntime.activated`).

    With an evaluation set, the version serving the name is scored on it
    first (once per device: :class:`EvalCache`), through the serving
    worker like any request, so the candidate's score has a baseline
    measured on the same device.
    """

    def __init__(self, runtime: InferenceRuntime, profile: RuntimeSettings,
                 timeout_s: float, cache: EvalCache | None = None) -> None:
        self.runtime, self.profile, self.timeout_s = runtime, profile, timeout_s
        self.cache = cache

    async def check(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        """See :meth:`HealthChecker.check`."""
        if request.adapter_of is not None:
            return await self._check_adapter(request, abort)
        spec = ModelSpec(
            key=request.key or request.model.parent.name,
            name=request.name or "model",
            version=request.version or "0",
            format=request.format,
            path=request.model,
            runtime=request.runtime,
            sha256=request.sha256 or "",
        )
        baseline = await self._active_scores(request)
        try:
            result = await self.runtime.prepare(spec, request.health_check(), abort,
                                                self.timeout_s)
        except PrepareAborted as exc:
            raise HealthAborted(str(exc)) from exc
        details = {k: v for k, v in result.items() if k not in ("passed", "reasons")}
        if "eval" in details and baseline is not None:
            details["eval_active"] = baseline
            details["eval_active_sha256"] = request.active_sha256
        if "eval" in details and self.cache is not None and request.sha256 and request.eval_sha256:
            # Once active, this version's score is the baseline of the next candidate.
            self.cache.put(request.sha256, request.eval_sha256, details["eval"])
        return HealthResult(bool(result.get("passed")), list(result.get("reasons", [])), details)

    async def _check_adapter(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        """An adapter's check on its base's worker; its evaluation's baseline is the
        active version of the adapter on that base build, or the base alone for a first."""
        assert request.adapter_of is not None
        base_sha256 = request.adapter_of[1]
        baseline = await self._adapter_baseline(request)
        result = await check_staged_adapter(self.runtime, request, abort, self.timeout_s)
        scores = result.details.get("eval")
        if scores is not None and baseline is not None:
            result.details["eval_active"] = baseline
            result.details["eval_active_sha256"] = request.active_sha256 or base_sha256
        if scores is not None and self.cache is not None and request.sha256 and request.eval_sha256:
            self.cache.put(adapter_cache_key(request.sha256, base_sha256), request.eval_sha256,
                           scores)
        return result

    async def _adapter_baseline(self, request: HealthRequest) -> dict[str, Any] | None:
        """The scores an adapter candidate is compared with: the active adapter version's
        on the same base build, or (a first adapter) the base's alone."""
        assert request.adapter_of is not None
        base, base_sha256, _ = request.adapter_of
        if not request.active_sha256:
            return await self._baseline(request, base_sha256, base, base_sha256, None)
        host = self.runtime.hosts.get(base)
        serving = host.serving if host is not None else None
        active = serving.adapters.get(request.name or "") if serving is not None else None
        if active is None or active.sha256 != request.active_sha256:
            return None  # not served on this build: no comparable figure
        return await self._baseline(request, adapter_cache_key(active.sha256, base_sha256),
                                    base, base_sha256, active.ref)

    async def _active_scores(self, request: HealthRequest) -> dict[str, Any] | None:
        """The serving version's scores on the request's set: cached, or measured now."""
        if not request.active_sha256:
            return None
        return await self._baseline(request, request.active_sha256, request.name or "model",
                                    request.active_sha256, None)

    async def _baseline(self, request: HealthRequest, cache_key: str, name: str, sha256: str,
                        adapter: str | None) -> dict[str, Any] | None:
        """Scores on the request's set of what ``name`` serves (build ``sha256``, with the
        worker's ``adapter`` applied, if any), cached under ``cache_key``, or measured now."""
        if request.eval_set is None or not request.eval_sha256:
            return None
        if self.cache is not None:
            cached = self.cache.get(cache_key, request.eval_sha256)
            if cached is not None:
                return cached
        host = self.runtime.hosts.get(name)
        serving = host.serving if host is not None else None
        if serving is None or serving.spec.sha256 != sha256:
            return None

        async def ask(item: Any) -> str | None:
            parts: list[str] = []
            body = chat_request(item)
            if adapter is not None:
                body["adapter"] = adapter
            try:
                async with self.runtime.lease(name) as (_, worker):
                    await worker.call("complete", {"request": body}, parts.append)
            except RemoteError as exc:  # this item's request refused: it fails, the rest run
                log.warning("evaluation item %s not answered by the active %s: %s",
                            item.id, name, exc)
                return None
            return "".join(parts)

        try:
            scores = await score_model(request.eval_set, request.eval_budget_s, ask)
        except Exception as exc:  # the baseline is optional; the candidate's check goes on
            log.warning("scoring the active %s on the evaluation set failed: %s", name, exc)
            return None
        if self.cache is not None:
            self.cache.put(cache_key, request.eval_sha256, scores)
        return scores
