"""Ollama's HTTP API on the agent's local listener (and on ``ollama_port`` if set).

Apps written for Ollama (its official clients, and anything configured
with ``http://127.0.0.1:11434``) reach the fleet's model unchanged:
``/api/chat``, ``/api/generate`` (NDJSON streamed by default),
``/api/embed``, ``/api/embeddings``, ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version``, and ``GET``/``HEAD /`` ("Ollama is
running"). Model management (``pull``, ``push``, ``create``, ``copy``,
``delete``, blobs) answers 403: the fleet decides what a device runs.

Generation runs through :class:`.generation.Generation`, as the OpenAI
routes do; requests are checked and translated in :mod:`.ollama_shapes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import h11

from protocol import ADAPTER_SEPARATOR, split_model

from . import ollama_model_info as info
from . import ollama_shapes as shapes
from .adapters import adapter_model_id, adapter_size
from .generation import Generation
from .ollama_shapes import OllamaError, Timing
from .runtime import Slot
from .schemas import ApiError, parse_json, pooled
from .supervisor import RemoteError, WorkerExited

if TYPE_CHECKING:
    from .api import LocalApi, Send

#: what ``/api/version`` answers: the Ollama release that brought the newest part of
#: its API served here (a JSON schema as ``format``)
OLLAMA_VERSION = "0.5.0"
MANAGED = ("models on this device are managed by the fleet: assign a release from the "
           "control plane")
#: ``expires_at`` of a model kept loaded until evicted (what Ollama answers for
#: ``keep_alive: -1``)
NEVER = "2318-01-01T00:00:00Z"


@contextlib.asynccontextmanager
async def _errors() -> AsyncIterator[None]:
    """Every failure as an :class:`OllamaError` (``{"error": "..."}``)."""
    # api.py imports this module for its route table: import back at call time.
    from .api import _mapped

    try:
        async with _mapped():
            yield
    except OllamaError:
        raise
    except ApiError as exc:
        raise OllamaError(exc.status, str(exc), headers=exc.headers) from exc


def _served(api: LocalApi, data: dict[str, Any]) -> tuple[Slot, str]:
    """(serving slot, the runtime's name for it) for the request's ``model``, or 404."""
    asked = data.get("model", data.get("name"))  # /api/show's older clients send `name`
    if not isinstance(asked, str) or not asked:
        raise OllamaError(400, "'model' is required and must be a string")
    base, adapter = split_model(asked)
    for host in api.runtime.hosts.values():
        slot = host.serving
        if slot is not None and (ref := shapes.resolve_name(base, slot.spec.name,
                                                             slot.spec.version)):
            if adapter is None:
                return slot, ref
            adapter = adapter.removesuffix(":latest")
            if adapter in slot.adapters:
                return slot, f"{ref}{ADAPTER_SEPARATOR}{adapter}"
    raise shapes.not_found(asked)


def _shown(slot: Slot) -> str:
    return shapes.display_name(slot.spec.name, slot.spec.version)


def _body(body: bytes) -> dict[str, Any]:
    try:
        return parse_json(body)
    except ApiError as exc:
        raise OllamaError(exc.status, str(exc)) from None


async def _ndjson(send: Send, payload: Any) -> None:
    await send(h11.Data(data=json.dumps(payload).encode() + b"\n"))


# -- generation ---------------------------------------------------------------------------


async def chat(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /api/chat``."""
    await _text_route(api, send, body, shapes.CHAT)


async def generate(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /api/generate``."""
    await _text_route(api, send, body, shapes.GENERATE)


_TRANSLATE = {shapes.CHAT: shapes.chat_request, shapes.GENERATE: shapes.generate_request}


async def _text_route(api: LocalApi, send: Send, body: bytes, route: str) -> None:
    async with _errors():
        data = _body(body)
        slot, ref = _served(api, data)
        asked = _TRANSLATE[route](data, api.settings.limits, slot.spec.runtime.context)
        await _text(api, send, route, slot, ref, asked)


async def _text(api: LocalApi, send: Send, route: str, slot: Slot, ref: str,
                asked: shapes.TextRequest) -> None:
    """Run one generation and answer it, NDJSON-streamed or as one object."""
    request = asked.request
    if request is None:
        # Ollama's load-only request: load the model (or, with keep_alive 0, unload it).
        empty = shapes.chat_message("", None) if route == shapes.CHAT else ""
        unloaded = asked.keep_alive == 0 and await api.runtime.unload(ref)
        if not unloaded:
            async with api.runtime.lease(ref, asked.keep_alive):
                pass
        await api._json(send, 200, shapes.final(route, _shown(slot), empty, None, None,
                                                unloaded))
        return
    started = time.perf_counter()
    async with Generation(api.runtime, ref, request, asked.keep_alive) as gen:
        leased = time.perf_counter()
        assert gen.slot is not None
        name = _shown(gen.slot)
        first = await gen.next_piece()
        if first is None and gen.failed_before_text():
            await gen.result()  # nothing sent yet: a plain error status
        first_at = time.perf_counter()
        if not asked.stream or request.get("tools"):
            # Tool calls are known only once the answer is whole: answer it whole.
            parts = []
            piece = first
            while piece is not None:
                parts.append(piece)
                piece = await gen.next_piece()
            done = await gen.result()
            text = "".join(parts)
            answer = shapes.chat_message(text, request) if route == shapes.CHAT else text
            timing = _timing(started, leased, first_at if parts else None, done)
            reply = shapes.final(route, name, answer, done, timing)
            if asked.stream:
                await _start_stream(send, gen.ref)
                await _ndjson(send, reply)
                await send(h11.EndOfMessage())
            else:
                await api._json(send, 200, reply, {"x-slmfleet-model": gen.ref})
            return
        await _start_stream(send, gen.ref)
        piece = first
        while piece is not None:
            await _ndjson(send, shapes.chunk(route, name, piece))
            piece = await gen.next_piece()
        try:
            done = await gen.result()
        except (WorkerExited, RemoteError) as exc:
            # Headers are out: report the failure in-band, as Ollama does. The
            # exchange itself ends cleanly, so the connection stays usable.
            await _ndjson(send, {"error": str(exc)})
            await send(h11.EndOfMessage())
            return
        empty = shapes.chat_message("", None) if route == shapes.CHAT else ""
        timing = _timing(started, leased, first_at if first is not None else None, done)
        await _ndjson(send, shapes.final(route, name, empty, done, timing))
        await send(h11.EndOfMessage())


async def _start_stream(send: Send, ref: str) -> None:
    await send(h11.Response(status_code=200, headers=[
        ("content-type", "application/x-ndjson"), ("cache-control", "no-cache"),
        ("x-slmfleet-model", ref)]))


def _timing(started: float, leased: float, first_at: float | None,
            done: dict[str, Any]) -> Timing:
    """Ollama's durations: waiting for the worker counts as loading, the worker's time to
    its first text as prompt evaluation, the rest of the answer as evaluation."""
    end = time.perf_counter()
    ttft_ms = done.get("ttft_ms")
    prompt_eval = ttft_ms / 1000 if ttft_ms is not None else (first_at or end) - leased
    return Timing(total=_ns(end - started), load=_ns(leased - started),
                  prompt_eval=_ns(prompt_eval), eval=_ns(end - first_at) if first_at else 0)


def _ns(seconds: float) -> int:
    return max(round(seconds * 1e9), 0)


# -- embeddings ---------------------------------------------------------------------------


async def embed(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /api/embed``: L2-normalized vectors, as Ollama answers."""
    async with _errors():
        reply = await _embed(api, body, shapes.EMBED)
        reply["embeddings"] = [shapes.normalized(v) for v in reply["embeddings"]]
        await api._json(send, 200, reply)


async def embeddings(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /api/embeddings`` (Ollama's older route): one vector, as the model gives it."""
    async with _errors():
        reply = await _embed(api, body, shapes.EMBEDDINGS)
        vectors = reply["embeddings"]
        await api._json(send, 200, {"embedding": vectors[0] if vectors else []})


async def _embed(api: LocalApi, body: bytes, route: str) -> dict[str, Any]:
    data = _body(body)
    slot, ref = _served(api, data)
    _, texts = shapes.embed_request(data, route, api.settings.limits, slot.spec.runtime.context)
    keep = shapes.keep_alive(data)
    name = _shown(slot)
    if not slot.spec.runtime.embeddings:
        raise OllamaError(400, f"'{name}' does not serve embeddings: its release runs it for "
                          "text generation")
    if not texts:
        # Load only, as on the text routes.
        if not (keep == 0 and await api.runtime.unload(ref)):
            async with api.runtime.lease(ref, keep):
                pass
        return {"model": name, "embeddings": []}
    started = time.perf_counter()
    done, _ = await api._call(ref, "embed", {"input": texts}, keep)
    return {"model": name, "embeddings": [pooled(v) for v in done["embeddings"]],
            "total_duration": _ns(time.perf_counter() - started), "load_duration": 0,
            "prompt_eval_count": done["prompt_tokens"]}


# -- what is served -----------------------------------------------------------------------


def _file(slot: Slot) -> tuple[int, str]:
    """(size in bytes, modification time) of the served file."""
    try:
        stat = os.stat(slot.spec.path)
    except OSError:
        return 0, shapes.now()
    stamp = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat().replace("+00:00", "Z")
    return stat.st_size, stamp


def _details(slot: Slot) -> dict[str, Any]:
    spec = slot.spec
    return info.details(spec.format, spec.path, spec.sha256)


async def tags(api: LocalApi, send: Send, body: bytes) -> None:
    """``GET /api/tags``: every assigned model, as ``name:latest`` and ``name:VERSION``."""
    models = []
    for host in api.runtime.hosts.values():
        if (slot := host.serving) is None:
            continue
        size, modified = _file(slot)
        for name in (f"{slot.spec.name}:latest", _shown(slot)):
            models.append({"name": name, "model": name, "modified_at": modified, "size": size,
                           "digest": slot.spec.sha256, "details": _details(slot)})
        for adapter in slot.adapters.values():
            name = f"{adapter_model_id(slot, adapter)}:latest"
            models.append({"name": name, "model": name, "modified_at": modified,
                           "size": adapter_size(adapter), "digest": adapter.sha256,
                           "details": {**_details(slot), "format": "gguf-lora"}})
    await api._json(send, 200, {"models": models})


async def ps(api: LocalApi, send: Send, body: bytes) -> None:
    """``GET /api/ps``: the models whose workers run now, with when each unloads."""
    models = []
    for host in api.runtime.hosts.values():
        slot = host.serving
        if slot is None or slot.worker is None or not slot.worker.alive:
            continue
        size, _ = _file(slot)
        name = _shown(slot)
        expires = host.expires_wall()
        models.append({
            "name": name, "model": name, "size": size, "digest": slot.spec.sha256,
            "details": _details(slot),
            "expires_at": NEVER if expires is None else shapes.stamp(expires),
            "size_vram": size if slot.spec.runtime.gpu_layers else 0,
            "context_length": slot.worker.info.get("context", slot.spec.runtime.context)})
    await api._json(send, 200, {"models": models})


async def show(api: LocalApi, send: Send, body: bytes) -> None:
    """``POST /api/show``."""
    async with _errors():
        data = _body(body)
        slot, _ = _served(api, data)
        verbose = data.get("verbose", False)
        if not isinstance(verbose, bool | None):
            raise OllamaError(400, "'verbose' must be true or false")
        spec = slot.spec
        _, modified = _file(slot)
        runtime = spec.runtime
        parameters = f"num_ctx {runtime.context}\nnum_thread {runtime.threads}"
        await api._json(send, 200, {
            "license": info.license_text(spec.format, spec.path, spec.sha256),
            "modelfile": f"# {_shown(slot)} as the fleet serves it on this device\n"
                         f"FROM {spec.path}\n"
                         + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
            "parameters": parameters,
            "template": info.template(spec.format, spec.path, spec.sha256),
            "details": _details(slot),
            "model_info": info.model_info(spec.format, spec.path, spec.sha256, bool(verbose)),
            "capabilities": ["embedding"] if runtime.embeddings else ["completion", "tools"],
            "modified_at": modified,
        })


async def version(api: LocalApi, send: Send, body: bytes) -> None:
    """``GET /api/version``."""
    await api._json(send, 200, {"version": OLLAMA_VERSION})


async def running(api: LocalApi, send: Send, body: bytes) -> None:
    """``GET /``: what apps probe to find Ollama."""
    await api._send_bytes(send, 200, b"Ollama is running", "text/plain; charset=utf-8")


async def running_head(api: LocalApi, send: Send, body: bytes) -> None:
    """``HEAD /``: the same, without the body."""
    await send(h11.Response(status_code=200, headers=[
        ("content-type", "text/plain; charset=utf-8"), ("content-length", "17")]))
    await send(h11.EndOfMessage())


async def managed(api: LocalApi, send: Send, body: bytes) -> None:
    """``pull``, ``push``, ``create``, ``copy``, ``delete``, blobs: the fleet decides."""
    raise OllamaError(403, MANAGED)


async def managed_head(api: LocalApi, send: Send, body: bytes) -> None:
    """``HEAD /api/blobs/...``: 403 too, headers only."""
    await send(h11.Response(status_code=403, headers=[("content-length", "0")]))
    await send(h11.EndOfMessage())


#: path -> {method: handler}; ``/api/blobs/*`` is every path under ``/api/blobs/``
ROUTES: dict[str, dict[str, Any]] = {
    "/": {"GET": running, "HEAD": running_head},
    "/api/version": {"GET": version},
    "/api/tags": {"GET": tags},
    "/api/ps": {"GET": ps},
    "/api/show": {"POST": show},
    "/api/chat": {"POST": chat},
    "/api/generate": {"POST": generate},
    "/api/embed": {"POST": embed},
    "/api/embeddings": {"POST": embeddings},
    **{f"/api/{op}": {"POST": managed} for op in ("pull", "push", "create", "copy")},
    "/api/delete": {"DELETE": managed},
    "/api/blobs/*": {"HEAD": managed_head, "POST": managed},
}
