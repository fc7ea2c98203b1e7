"""LoRA adapters on the served base models (agent side; the worker side is :mod:`.lora`).

An adapter is served by its base model's worker: it is loaded there beside
the base weights (never a second copy of the base), health-checked there
under its version's own key (``name@version``) while the active version
keeps serving, and made active by pointing its name at that key in the
base's serving :class:`Slot` (``Slot.adapters``), with no reload. A request
names it as ``<base>+<adapter>`` (:func:`protocol.split_model`); the slot
maps the adapter's name to the key its worker knows. The old version's key
is freed in the worker between two decoding turns, after the requests that
named it finished.

An adapter serves only on the base build it was made for: its spec names
the base's artifact sha256, and a base version with another sha256 leaves
it inactive (:func:`activate_adapter` says why) until an adapter made for
that build arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from protocol import ADAPTER_SEPARATOR, split_model

from ..healthcheck import HealthAborted, HealthRequest, HealthResult
from ..healthcheck.evaluation import score_in_worker
from ..healthcheck.rules import judge
from .slot import NoModel, Slot, Unavailable
from .supervisor import RemoteError, WorkerExited, WorkerLoadError

if TYPE_CHECKING:
    from .runtime import InferenceRuntime
    from .spec import AdapterSpec

log = logging.getLogger(__name__)

#: how long an adapter waits for the runtime to serve its base (at start-up)
BASE_WAIT_S = 60.0


def adapter_key(slot: Slot, model: str) -> str | None:
    """The worker's key for the adapter ``model`` names on ``slot`` (None: no adapter)."""
    name = split_model(model)[1]
    if name is None:
        return None
    spec = slot.adapters.get(name)
    if spec is None:
        raise NoModel(f"adapter {name!r} is not served on {slot.spec.ref}; it serves "
                      f"{sorted(slot.adapters) or 'none'}")
    return spec.ref


def base_slot(runtime: InferenceRuntime, adapter: AdapterSpec) -> Slot | str:
    """The serving slot of ``adapter``'s base build, or why there is none."""
    host = runtime.hosts.get(adapter.base)
    slot = host.serving if host is not None else None
    if slot is None or slot.retired:
        return f"base_mismatch: {adapter.ref} applies to {adapter.base}, which is not served"
    if slot.spec.sha256 != adapter.base_sha256:
        return (f"base_mismatch: {adapter.ref} applies to {adapter.base} with sha256 "
                f"{adapter.base_sha256[:12]}..., served is {slot.spec.ref} "
                f"({slot.spec.sha256[:12]}...)")
    return slot


async def _served_base(runtime: InferenceRuntime, adapter: AdapterSpec) -> Slot | str:
    """:func:`base_slot`, after waiting for the runtime to serve the base at all.

    After a restart the update pipeline resumes while the runtime is still
    bringing up the installed models: an adapter waits for its base to be
    served (it was active when the adapter was accepted) rather than fail.
    """
    deadline = time.monotonic() + BASE_WAIT_S
    while time.monotonic() < deadline:
        host = runtime.hosts.get(adapter.base)
        if host is not None and host.serving is not None:
            break
        await asyncio.sleep(0.1)
    return base_slot(runtime, adapter)


async def _load(slot: Slot, adapter: AdapterSpec) -> dict[str, Any]:
    """Load ``adapter`` into the slot's worker (started if it is not)."""
    async with slot.starting:
        worker = await slot.ensure_running()
    return await worker.call("adapter_load", adapter.load_payload())


def _candidate_base(runtime: InferenceRuntime, adapter: AdapterSpec) -> Slot | None:
    """The warm candidate of the adapter's base build, when its unit brings that build."""
    for hosts in (runtime.hosts, runtime._pending):
        host = hosts.get(adapter.base)
        slot = host.candidate if host is not None else None
        if slot is not None and slot.spec.sha256 == adapter.base_sha256:
            return slot
    return None


async def _checked_base(runtime: InferenceRuntime, adapter: AdapterSpec,
                        wait_s: float) -> Slot | str:
    """Where ``adapter`` is checked: its base build serving, or (a base and its adapter
    arriving as one unit) that build's candidate once the base passed its own check.

    Waits up to ``wait_s`` for either (the base's check runs meanwhile), then
    says why there is none.
    """
    deadline = time.monotonic() + wait_s
    while True:
        slot = base_slot(runtime, adapter)
        if not isinstance(slot, str):
            return slot
        candidate = _candidate_base(runtime, adapter)
        if candidate is not None:
            return candidate
        if time.monotonic() >= deadline:
            return slot
        await asyncio.sleep(0.2)


async def check_adapter(runtime: InferenceRuntime, adapter: AdapterSpec,
                        health_check: dict[str, Any], wait_s: float = BASE_WAIT_S
                        ) -> dict[str, Any]:
    """Load ``adapter`` on its base's worker and run its golden prompts with it.

    The version stays loaded under its own key when it passed (activation
    then only points its name at it); it is freed when it failed.
    """
    slot = await _checked_base(runtime, adapter, wait_s)
    if isinstance(slot, str):
        return {"passed": False, "reasons": [slot]}
    started = time.perf_counter()

    async def applied(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        # Every prompt of the check, golden or evaluation item, with the adapter applied.
        if slot.worker is None:
            raise Unavailable(f"{slot.spec.ref} stopped during the check of {adapter.ref}")
        return await slot.worker.call(op, {**payload, "adapter": adapter.ref})

    try:
        loaded = await _load(slot, adapter)
        outcomes = [await applied("check_prompt", {"item": item})
                    for item in health_check.get("golden_prompts") or []]
        result = judge(health_check, outcomes)
        if result["passed"] and health_check.get("eval"):
            # The quality gate compares it with the previous adapter version on
            # this base (or the base alone): see WorkerHealthChecker.
            result["eval"] = await score_in_worker(applied, health_check["eval"])
    except (RemoteError, WorkerExited, WorkerLoadError, Unavailable) as exc:
        return {"passed": False, "reasons": [f"adapter check failed: {exc}"]}
    result["adapter_load_ms"] = loaded.get("load_ms")
    result["check_ms"] = round((time.perf_counter() - started) * 1000, 1)
    if not result.get("passed"):
        await _drop(slot, adapter.ref)
    return result


async def _drop(slot: Slot, key: str) -> None:
    worker = slot.worker
    if worker is not None and worker.alive:
        try:
            await worker.call("adapter_drop", {"name": key})
        except (RemoteError, WorkerExited) as exc:
            log.warning("freeing adapter %s on %s: %s", key, slot.spec.ref, exc)


async def activate_adapter(runtime: InferenceRuntime, adapter: AdapterSpec) -> str | None:
    """Serve ``adapter`` as its name's version on its base; None, or why it stays inactive.

    No base weights are loaded: the worker already holds the adapter from
    its check (or loads it now, after an agent restart); the name then
    points at it and the previous version is freed once its requests ended.
    """
    slot = await _served_base(runtime, adapter)
    if isinstance(slot, str):
        for host in runtime.hosts.values():  # not served elsewhere either
            if host.serving is not None:
                host.serving.adapters.pop(adapter.name, None)
        return slot
    old = slot.adapters.get(adapter.name)
    if slot.loaded:
        try:
            await _load(slot, adapter)
        except (RemoteError, WorkerExited, WorkerLoadError, Unavailable) as exc:
            return f"adapter {adapter.ref} does not load: {exc}"
    # Not loaded (unloaded to make room): the next start loads it with the base.
    slot.adapters[adapter.name] = adapter
    log.info("serving adapter %s on %s", adapter.ref, slot.spec.ref)
    if old is not None and old.ref != adapter.ref:
        await _drop(slot, old.ref)
    return None


async def remove_adapter(runtime: InferenceRuntime, name: str) -> bool:
    """Stop serving adapter ``name`` (rolled back or left the set); True if it was served."""
    found = False
    for host in list(runtime.hosts.values()):
        slot = host.serving
        if slot is None or name not in slot.adapters:
            continue
        spec = slot.adapters.pop(name)
        found = True
        await _drop(slot, spec.ref)
    return found


def served_adapters(runtime: InferenceRuntime) -> list[tuple[Slot, AdapterSpec]]:
    """Every adapter served now, with the slot of its base (for model lists)."""
    return [(host.serving, spec) for host in runtime.hosts.values()
            if host.serving is not None for spec in host.serving.adapters.values()]



async def check_staged_adapter(runtime: InferenceRuntime, request: HealthRequest,
                               abort: asyncio.Event, timeout_s: float) -> HealthResult:
    """The update pipeline's health check of a staged adapter (:func:`check_adapter`)."""
    from .spec import AdapterSpec

    assert request.adapter_of is not None
    base, base_sha256, scale = request.adapter_of
    spec = AdapterSpec(name=request.name or request.model.parent.name,
                       version=request.version or "0", base=base, base_sha256=base_sha256,
                       path=request.model, scale=scale, sha256=request.sha256 or "")
    # Not longer than the check may take: the base's own check may run first.
    work = asyncio.ensure_future(check_adapter(runtime, spec, request.health_check(),
                                               wait_s=max(timeout_s - 30.0, timeout_s / 2)))
    stop = asyncio.ensure_future(abort.wait())
    try:
        done, _ = await asyncio.wait({work, stop}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if work not in done:
        work.cancel()
        if stop in done:
            raise HealthAborted("health check aborted")
        return HealthResult(False, [f"health check timed out after {timeout_s:g} s"])
    result = work.result()
    details = {k: v for k, v in result.items() if k not in ("passed", "reasons")}
    return HealthResult(bool(result.get("passed")), list(result.get("reasons", [])), details)


def adapter_cache_key(adapter_sha256: str, base_sha256: str) -> str:
    """What an adapter's evaluation scores are kept under: it applied to that base build."""
    return f"{adapter_sha256}+{base_sha256}"


def adapter_model_id(slot: Slot, adapter: AdapterSpec) -> str:
    """What a request names to get ``adapter`` on ``slot``'s base: ``<base>+<adapter>``."""
    return f"{slot.spec.name}{ADAPTER_SEPARATOR}{adapter.name}"


def adapter_size(adapter: AdapterSpec) -> int:
    """The adapter file's size in bytes (0 when it cannot be read)."""
    try:
        return adapter.path.stat().st_size
    except OSError:
        return 0


def openai_entries(slot: Slot) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the adapters served on ``slot``'s base."""
    return [{"id": adapter_model_id(slot, a), "object": "model", "created": 0,
             "owned_by": "slmfleet", "version": a.version, "format": "gguf-lora",
             "adapter_of": slot.spec.ref, "embeddings": False, "loaded": slot.loaded}
            for a in slot.adapters.values()]


def carry_adapters(runtime: InferenceRuntime, old: Slot, new: Slot) -> None:
    """A new version of a base takes traffic: the adapters made for its build follow it.

    Each is loaded into the new worker before its name points there; one
    made for the old build stays behind (the agent reports it inactive).
    """
    for adapter in old.adapters.values():
        if adapter.base_sha256 == new.spec.sha256:
            spawn(runtime, activate_adapter(runtime, adapter), f"carry-{adapter.ref}")
        else:
            log.warning("adapter %s does not apply to %s: inactive", adapter.ref, new.spec.ref)


def spawn(runtime: InferenceRuntime, coro: Any, name: str) -> None:
    """Run ``coro`` as one of the runtime's tasks (cancelled when it closes)."""
    runtime._spawn(coro, name)
