"""One text generation on a worker, as every front end of the local API runs it.

The OpenAI routes (:mod:`.api`) and the Ollama routes share this: the
lease on the serving worker, text pieces as they are decoded, the
per-version counters, and stopping the worker's work when the caller goes
away before the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Any

from .adapters import adapter_key
from .runtime import InferenceRuntime, Slot
from .supervisor import Worker


class Generation:
    """``async with Generation(runtime, model, request) as gen``, then read
    :meth:`next_piece` until None and :meth:`result`.

    Leaving the block before the result (the client went away, an error)
    cancels the request in the worker, and kills a worker stuck past that.
    """

    def __init__(self, runtime: InferenceRuntime, model: str, request: dict[str, Any],
                 keep_alive_s: float | None = None) -> None:
        self._runtime, self._model, self._request = runtime, model, request
        #: how long the model stays loaded afterwards (None: the runtime's default)
        self._keep_alive_s = keep_alive_s
        self._lease: Any = None
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self._stamps: list[float] = []
        self._ids: list[int] = []
        self._call: asyncio.Task[dict[str, Any]] | None = None
        self._started = 0.0
        self.slot: Slot | None = None
        self.worker: Worker | None = None

    @property
    def ref(self) -> str:
        """``name@version`` of the model that answers."""
        assert self.slot is not None
        return self.slot.spec.ref

    async def __aenter__(self) -> Generation:
        self._started = time.perf_counter()
        self._lease = self._runtime.lease(self._model, self._keep_alive_s)
        self.slot, self.worker = await self._lease.__aenter__()
        request = self._request
        try:
            adapter = adapter_key(self.slot, self._model)
        except BaseException:
            await self._lease.__aexit__(None, None, None)
            raise
        if adapter is not None:
            request = {**request, "adapter": adapter}
        self._call = asyncio.create_task(self.worker.call(
            "complete", {"request": request}, self._on_delta, self._ids.append))
        self._call.add_done_callback(lambda _: self._pieces.put_nowait(None))
        return self

    def _on_delta(self, text: str) -> None:
        self._stamps.append(time.perf_counter())
        self._pieces.put_nowait(text)

    async def next_piece(self) -> str | None:
        """The next piece of text as decoded; None once the worker is done (or failed)."""
        return await self._pieces.get()

    def failed_before_text(self) -> bool:
        """True when the request ended in an error before any text came."""
        call = self._call
        return (not self._stamps and call is not None and call.done()
                and not call.cancelled() and call.exception() is not None)

    async def result(self) -> dict[str, Any]:
        """The worker's ``done`` frame (raises what the worker or runtime raised)."""
        assert self._call is not None
        return await self._call

    def rest(self) -> str:
        """All text not yet read with :meth:`next_piece` (for a non-streamed answer)."""
        out = []
        while not self._pieces.empty():
            piece = self._pieces.get_nowait()
            if piece is not None:
                out.append(piece)
        return "".join(out)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        call, slot, worker = self._call, self.slot, self.worker
        assert call is not None and slot is not None and worker is not None
        done: dict[str, Any] = {}
        try:
            if not call.done():
                # The caller went away mid-answer: stop generating for nobody.
                if self._ids:
                    worker.cancel(self._ids[0])
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(call), 30)
                if not call.done():
                    worker.kill()  # stuck past a cancel: the supervisor restarts it
            if exc is None and call.done() and not call.cancelled() \
                    and call.exception() is None:
                done = call.result()
            stamps, end = self._stamps, time.perf_counter()
            slot.stats.record(
                ok=bool(done), latency_s=end - self._started,
                ttft_s=stamps[0] - self._started if stamps else None,
                prompt_tokens=done.get("prompt_tokens", 0),
                completion_tokens=done.get("completion_tokens", 0),
                decode_s=stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0,
            )
            if done:
                slot.ran_ok()
        finally:
            await self._lease.__aexit__(kind, exc, tb)
        return None
