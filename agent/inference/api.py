"""The local OpenAI-compatible API on 127.0.0.1 (and optionally a unix socket).

HTTP/1.1 is parsed by h11 on plain asyncio streams. Why not
Starlette/uvicorn: importing them costs the agent ~14 MB of resident
memory against an idle budget of 40 MB; h11 costs ~0.3 MB, is a complete,
strict HTTP/1.1 parser, and six routes need no framework.

Routes: ``POST /v1/chat/completions``, ``/v1/completions`` (both streamed
as server-sent events when ``stream`` is true), ``/v1/embeddings``,
``/v1/infer`` (ONNX inputs and outputs by name), ``GET /v1/models``,
``/healthz``, ``/metrics``; Ollama's ``/api/*`` routes from :mod:`.ollama_api`,
also on ``ollama_port`` when set; ``/v1/update-lock`` from :mod:`.update_lock_api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from ..update.locks import UpdateLocks
from . import metrics, ollama_api, schemas, update_lock_api
from .adapters import openai_entries
from .generation import Generation
from .runtime import InferenceRuntime, NoModel, Overloaded, Unavailable
from .schemas import ApiError
from .supervisor import RemoteError, WorkerExited
from .tool_calls import CallStarted, EnvelopeReader, Event, Reply, TextPiece, ToolPlan, read_reply

log = logging.getLogger(__name__)

#: request line plus headers
MAX_HEADER_BYTES = 16 * 1024
#: a client that sends nothing for this long on an idle connection is dropped
IDLE_TIMEOUT_S = 60.0

Send = Callable[[h11.Event], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Where the API listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 0
    socket_path: Path | None = None
    #: also listen here (Ollama's port, 11434, for apps configured for Ollama); 0 picks one
    ollama_port: int | None = None
    max_body_bytes: int = 1 << 20
    limits: schemas.Limits = field(default_factory=schemas.Limits)


class _ClientGone(Exception):
    """The client closed the connection while we were answering."""


class LocalApi:
    """Serves :class:`InferenceRuntime` over HTTP; ``await start()``, then ``close()``."""

    def __init__(self, runtime: InferenceRuntime, settings: ApiSettings,
                 locks: UpdateLocks | None = None) -> None:
        self.runtime, self.settings, self.locks = runtime, settings, locks
        self._servers: list[asyncio.base_events.Server] = []
        self.port: int | None = None
        self.ollama_port: int | None = None
        #: open connections, each True while it answers a request
        self._connections: dict[asyncio.StreamWriter, bool] = {}
        self._closing = False
        self._drained = asyncio.Event()

    async def start(self) -> None:
        """Listen; :attr:`port` (and :attr:`ollama_port`) are the bound TCP ports
        (useful with port 0). Raises OSError, listening nowhere, if one cannot be bound."""
        s = self.settings
        try:
            self.port = await self._listen(s.port)
            if s.ollama_port is not None:
                self.ollama_port = await self._listen(s.ollama_port)
        except OSError:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise
        if s.socket_path is not None:
            s.socket_path.unlink(missing_ok=True)
            self._servers.append(await asyncio.start_unix_server(
                self._connection, str(s.socket_path), limit=MAX_HEADER_BYTES))
            s.socket_path.chmod(0o660)

    async def _listen(self, port: int) -> int:
        server = await asyncio.start_server(self._connection, self.settings.host, port,
                                            limit=MAX_HEADER_BYTES)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def close(self, drain_s: float = 0.0) -> None:
        """Stop listening, let requests being answered finish (up to ``drain_s``),
        and close the connections between requests.

        A request that arrives meanwhile on a kept-alive connection is answered
        ``503 shutting_down``; one still running after ``drain_s`` ends with
        its worker.
        """
        self._closing = True
        for server in self._servers:
            server.close()
        if self._answering():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_s)
            if left := self._answering():
                log.warning("%d local request(s) still running after %g s; they end with "
                            "the workers", left, drain_s)
        for writer, busy in list(self._connections.items()):
            if not busy:
                writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def _answering(self) -> int:
        return sum(self._connections.values())

    def _mark(self, writer: asyncio.StreamWriter, busy: bool | None) -> None:
        """Record a connection as answering, between requests or (None) gone."""
        if busy is None:
            self._connections.pop(writer, None)
        else:
            self._connections[writer] = busy
        if not busy and self._closing and not self._answering():
            self._drained.set()

    # -- HTTP plumbing -----------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

        async def send(event: h11.Event) -> None:
            data = conn.send(event)
            if data:
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, RuntimeError) as exc:
                    raise _ClientGone() from exc

        self._mark(writer, False)
        try:
            while True:
                request = await self._next_request(conn, reader, send)
                if request is None:
                    break
                if self._closing:
                    await self._error(send, ApiError(503, "the agent is stopping",
                                                     code="shutting_down",
                                                     headers={"retry-after": "5"}))
                    break
                self._mark(writer, True)
                try:
                    await self._answer(conn, reader, send, request)
                finally:
                    self._mark(writer, False)
                if self._closing:
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (_ClientGone, ConnectionError, TimeoutError):
            pass
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(Exception):
                await self._error(send, ApiError(exc.error_status_hint, f"bad HTTP: {exc}",
                                                 code="bad_http"))
        finally:
            self._mark(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _receive(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT_S)
            conn.receive_data(data)

    async def _next_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            send: Send) -> h11.Request | None:
        event = await self._receive(conn, reader)
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed (or a client that hung up mid-way)

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader,
                    request: h11.Request) -> bytes:
        cap = self.settings.max_body_bytes
        for name, value in request.headers:
            if name == b"content-length" and int(value) > cap:
                raise ApiError(413, f"request body is {int(value)} bytes, limit {cap}",
                               code="request_too_large")
        body = bytearray()
        while True:
            event = await self._receive(conn, reader)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > cap:
                    raise ApiError(413, f"request body exceeds {cap} bytes",
                                   code="request_too_large")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise _ClientGone()

    async def _answer(self, conn: h11.Connection, reader: asyncio.StreamReader, send: Send,
                      request: h11.Request) -> None:
        method, path = request.method.decode(), request.target.decode().split("?", 1)[0]
        try:
            # Read to the end of every request, a GET's (empty) body included:
            # h11 starts the connection's next cycle only once the request is done.
            body = await self._body(conn, reader, request)
            update_lock_api.REQUEST_PATH.set(path)
            route = _route(path)
            if route is None:
                raise ApiError(404, f"no route {path}", code="not_found")
            handler = route.get(method)
            if handler is None:
                allow = ", ".join(route)
                raise ApiError(405, f"{path} takes {allow}", code="method_not_allowed",
                               headers={"allow": allow})
            await handler(self, send, body)
        except ApiError as exc:
            if conn.our_state is h11.SEND_RESPONSE:
                await self._error(send, exc)
            if conn.their_state is not h11.DONE:
                # We answered before reading all of the body: this connection is done.
                raise _ClientGone() from None

    @staticmethod
    async def _send_bytes(send: Send, status: int, body: bytes, content_type: str,
                          headers: dict[str, str] | None = None) -> None:
        fields = [("content-type", content_type), ("content-length", str(len(body)))]
        fields += list((headers or {}).items())
        await send(h11.Response(status_code=status, headers=fields))
        await send(h11.Data(data=body))
        await send(h11.EndOfMessage())

    async def _json(self, send: Send, status: int, payload: Any,
                    headers: dict[str, str] | None = None) -> None:
        await self._send_bytes(send, status, json.dumps(payload).encode(), "application/json",
                               headers)

    async def _error(self, send: Send, exc: ApiError) -> None:
        await self._json(send, exc.status, exc.body(), exc.headers)

    # -- routes --------------------------------------------------------------------------

    async def healthz(self, send: Send, body: bytes) -> None:
        """200 when a healthy model is serving, else 503 with the reason."""
        ok, details = self.runtime.health()
        await self._json(send, 200 if ok else 503, details)

    async def metrics(self, send: Send, body: bytes) -> None:
        """Prometheus text."""
        runtime = self.runtime
        text = metrics.render(runtime.all_stats(), runtime.queue_depths(),
                              runtime.loaded_refs()).encode()
        await self._send_bytes(send, 200, text, "text/plain; version=0.0.4; charset=utf-8")

    async def models(self, send: Send, body: bytes) -> None:
        """Every assigned model, loaded or not, OpenAI's ``list`` shape."""
        data = []
        for host in self.runtime.hosts.values():
            if (slot := host.serving) is None:
                continue
            spec = slot.spec
            data.append({"id": spec.name, "object": "model", "created": 0,
                         "owned_by": "slmfleet", "version": spec.version,
                         "format": spec.format, "embeddings": spec.runtime.embeddings,
                         "loaded": slot.loaded})
            data += openai_entries(slot)
        await self._json(send, 200, {"object": "list", "data": data})

    async def chat(self, send: Send, body: bytes) -> None:
        """``/v1/chat/completions``."""
        model, stream, request = schemas.chat_request(schemas.parse_json(body),
                                                      self.settings.limits)
        await self._generate(send, model, stream, request, chat=True)

    async def completions(self, send: Send, body: bytes) -> None:
        """``/v1/completions``."""
        model, stream, request = schemas.completion_request(schemas.parse_json(body),
                                                            self.settings.limits)
        await self._generate(send, model, stream, request, chat=False)

    async def embeddings(self, send: Send, body: bytes) -> None:
        """``/v1/embeddings``."""
        request = schemas.parse_json(body)
        model, texts = schemas.embeddings_request(request, self.settings.limits)
        fmt = schemas.embedding_encoding(request)
        done, ref = await self._call(model, "embed", {"input": texts})
        data = [{"object": "embedding", "index": i,
                 "embedding": schemas.encoded_embedding(schemas.pooled(v), fmt)}
                for i, v in enumerate(done["embeddings"])]
        tokens = done["prompt_tokens"]
        await self._json(send, 200, {"object": "list", "data": data, "model": ref,
                                     "usage": {"prompt_tokens": tokens,
                                               "total_tokens": tokens}})

    async def infer(self, send: Send, body: bytes) -> None:
        """``/v1/infer``: run an ONNX graph on named inputs."""
        model, inputs, outputs = schemas.infer_request(schemas.parse_json(body))
        done, ref = await self._call(model, "infer", {"inputs": inputs, "outputs": outputs})
        await self._json(send, 200, {"model": ref, "outputs": done["outputs"]})

    # -- running requests ------------------------------------------------------------------

    async def _call(self, model: str, op: str, payload: dict[str, Any],
                    keep_alive_s: float | None = None) -> tuple[dict, str]:
        """One non-streamed worker request, counted, errors mapped to HTTP."""
        started = time.perf_counter()
        async with _mapped(), self.runtime.lease(model, keep_alive_s) as (slot, worker):
            try:
                done = await worker.call(op, payload)
            except BaseException:
                slot.stats.record(ok=False, latency_s=time.perf_counter() - started)
                raise
            elapsed = time.perf_counter() - started
            slot.stats.record(ok=True, latency_s=elapsed, ttft_s=elapsed,
                              prompt_tokens=done.get("prompt_tokens", 0))
            slot.ran_ok()
            return done, slot.spec.ref

    async def _generate(self, send: Send, model: str, stream: bool, request: dict[str, Any],
                        *, chat: bool) -> None:
        rid = schemas.new_id("chatcmpl" if chat else "cmpl")
        async with _mapped(), Generation(self.runtime, model, request) as gen:
            if stream:
                await self._stream(send, gen, rid, request, chat)
                return
            done = await gen.result()
            if chat:
                body = _chat_answer(rid, gen.ref, request, gen.rest(), done)
            else:
                body = schemas.text_response(rid, gen.ref, gen.rest(), done)
            await self._json(send, 200, body, {"x-slmfleet-model": gen.ref})

    async def _stream(self, send: Send, gen: Generation, rid: str, request: dict[str, Any],
                      chat: bool) -> None:
        ref = gen.ref
        plan = ToolPlan.from_wire(request.get("tools")) if chat else None
        reader = EnvelopeReader(plan)
        deltas = _ChatDeltas()
        first = await gen.next_piece()
        if first is None and gen.failed_before_text():
            await gen.result()  # nothing sent yet: raise, so the caller gets a plain error status
        await send(h11.Response(status_code=200, headers=[
            ("content-type", "text/event-stream"), ("cache-control", "no-cache"),
            ("x-slmfleet-model", ref)]))

        async def event(payload: Any) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            await send(h11.Data(data=f"data: {text}\n\n".encode()))

        if chat:
            # content null until text comes, when the answer may be calls alone
            content = None if plan is not None and plan.calls_possible else ""
            await event(schemas.chat_chunk(rid, ref, {"role": "assistant", "content": content}))
        piece = first
        while piece is not None:
            if chat:
                for delta in deltas.of(reader.feed(piece)):
                    await event(schemas.chat_chunk(rid, ref, delta))
            else:
                await event(schemas.text_chunk(rid, ref, piece))
            piece = await gen.next_piece()
        try:
            done = await gen.result()
        except (WorkerExited, RemoteError) as exc:
            # Headers are out: report the failure in-band, as OpenAI's API does.
            status = exc.status if isinstance(exc, RemoteError) else 503
            await event(ApiError(status, str(exc), code="worker_error").body())
            await send(h11.EndOfMessage())
            raise _Reported() from exc
        use = schemas.usage(done["prompt_tokens"], done["completion_tokens"])
        await event(schemas.chat_chunk(rid, ref, {}, _finish(reader.finish(), done), use)
                    if chat else schemas.text_chunk(rid, ref, "", done["finish_reason"], use))
        await event("[DONE]")
        await send(h11.EndOfMessage())


class _ChatDeltas:
    """Reader events as OpenAI's chat deltas, each call under an id of its own."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def of(self, events: list[Event]) -> list[dict[str, Any]]:
        out = []
        for item in events:
            if isinstance(item, TextPiece):
                out.append({"content": item.text})
            elif isinstance(item, CallStarted):
                self.ids.append(schemas.call_id())
                out.append(schemas.tool_call_start(item.index, self.ids[-1], item.name))
            else:
                out.append(schemas.tool_call_arguments(item.index, item.text))
        return out


def _finish(reply: Reply, done: dict[str, Any]) -> str:
    """``tool_calls`` for an answer whose calls all closed, else the worker's reason."""
    if reply.calls and reply.complete and done["finish_reason"] == "stop":
        return "tool_calls"
    return done["finish_reason"]


def _chat_answer(rid: str, ref: str, request: dict[str, Any], text: str,
                 done: dict[str, Any]) -> dict[str, Any]:
    """A whole ``chat.completion``: the text, or the content and calls of its envelope."""
    reply = read_reply(ToolPlan.from_wire(request.get("tools")), text)
    calls = [schemas.tool_call(schemas.call_id(), c.name, c.arguments) for c in reply.calls]
    return schemas.chat_response(rid, ref, reply.content, done, calls, _finish(reply, done))


class _Reported(Exception):
    """A streamed request failed after its headers went out; the error went in-band."""


@contextlib.asynccontextmanager
async def _mapped() -> Any:
    """Runtime and worker failures as the HTTP errors callers should see."""
    try:
        yield
    except NoModel as exc:
        raise ApiError(404, str(exc), code="model_not_found", param="model") from exc
    except Overloaded as exc:
        raise ApiError(503, f"busy: {exc}", code="overloaded",
                       headers={"retry-after": str(exc.retry_after_s)}) from exc
    except Unavailable as exc:
        raise ApiError(503, str(exc), code="model_unavailable",
                       headers={"retry-after": "5"}) from exc
    except RemoteError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from exc
    except WorkerExited as exc:
        raise ApiError(503, f"{exc}; it is being restarted", code="worker_crashed",
                       headers={"retry-after": "1"}) from exc
    except _Reported as exc:
        raise _ClientGone() from exc


Handler = Callable[[LocalApi, Send, bytes], Awaitable[None]]

#: path -> {method: handler}; a path ending in ``/*`` takes every path under it
_ROUTES: dict[str, dict[str, Handler]] = {
    "/healthz": {"GET": LocalApi.healthz},
    "/metrics": {"GET": LocalApi.metrics},
    "/v1/models": {"GET": LocalApi.models},
    "/v1/chat/completions": {"POST": LocalApi.chat},
    "/v1/completions": {"POST": LocalApi.completions},
    "/v1/embeddings": {"POST": LocalApi.embeddings},
    "/v1/infer": {"POST": LocalApi.infer},
    **ollama_api.ROUTES,
    **update_lock_api.ROUTES,
}


def _route(path: str) -> dict[str, Handler] | None:
    """The handlers of ``path``: its own, or those of the nearest ``/*`` route above it."""
    route, head = _ROUTES.get(path), path
    while route is None and head.count("/") > 1:
        head = head.rsplit("/", 1)[0]
        route = _ROUTES.get(head + "/*")
    return route
