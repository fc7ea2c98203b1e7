"""The inference worker: one model in one subprocess, ``python -m agent.inference.worker``.

The agent (:mod:`agent.inference.supervisor`) talks to it in JSON lines:
requests on stdin, replies on the file descriptor that was stdout (native
code's own prints are sent to stderr, so they cannot corrupt a reply).

agent -> worker::

    {"op": "load", "model": PATH, "format": "gguf"|"onnx", "runtime": {...}}
    {"op": "check_prompt", "id": N, "item": {...}, "adapter": S|null}   one golden prompt
    {"op": "check_embeddings", "id": N, "health_check": {...}}
    {"op": "complete", "id": N, "request": {"messages"|"prompt", "max_tokens", ...,
                                            "response_format": null|{"type", "schema"}}}
    {"op": "embed", "id": N, "input": [TEXT, ...]}
    {"op": "infer", "id": N, "inputs": {NAME: TENSOR}, "outputs": [NAME]|null}
    {"op": "adapter_load", "id": N, "name": S, "path": PATH, "scale": F}   a LoRA adapter
    {"op": "adapter_drop", "id": N, "name": S}            free it between turns
    {"op": "cancel", "id": N}                             stop generating N

worker -> agent::

    {"op": "ready", "load_ms": F, "info": {...}}  |  {"op": "load_failed", "error": S}
    {"op": "delta", "id": N, "text": S}           (complete only, as decoded)
    {"op": "done", "id": N, ...result}
    {"op": "error", "id": N, "status": 4xx|5xx, "code": S, "message": S}

A model with slots (llama.cpp, ``runtime.parallel``) decodes up to that many
``complete`` requests at once: the frame loop hands each to the backend's
decoding thread, which sends its ``delta`` and ``done`` frames itself, and
reads the next frame at once. Other ops run one at a time in the frame loop;
the agent never sends more ``complete`` frames than the model has slots.
``cancel`` is read by a thread and lands while a generation runs.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..child_lifetime import die_with, parent_from
from ..healthcheck.rules import check_embeddings, run_prompt
from .backend import Backend, BadRequest, Completion, load_backend

#: shortest gap between two delta frames of one generation (the first goes at once)
DELTA_EVERY_S = 0.025


class _Channel:
    """Reply writer (one lock: the frame loop and the decoding thread both write) and
    request reader (a thread, so ``cancel`` lands while a generation runs)."""

    def __init__(self, out_fd: int) -> None:
        self._out = os.fdopen(out_fd, "w", buffering=1)
        self._lock = threading.Lock()
        self.requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[int] = set()
        threading.Thread(target=self._read, name="requests", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            frame = json.loads(line)
            if frame.get("op") == "cancel":
                self.cancelled.add(frame["id"])
            else:
                self.requests.put(frame)
        self.requests.put(None)  # the agent closed our stdin: time to go

    def send(self, frame: dict[str, Any]) -> None:
        data = json.dumps(frame, separators=(",", ":")) + "\n"
        with self._lock:
            self._out.write(data)


class _Deltas:
    """A generation's text on its way to the agent.

    The first piece goes at once (time to first token); later ones at most
    every :data:`DELTA_EVERY_S`, joined: each frame wakes the agent, and a
    wake-up beside llama.cpp's spinning threads stalls the next token.
    """

    def __init__(self, channel: _Channel, rid: int) -> None:
        self._channel, self._rid = channel, rid
        self._held: list[str] = []
        self._sent_at: float | None = None
        self.first_at: float | None = None

    def emit(self, text: str) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self._held.append(text)
        if self._sent_at is None or now - self._sent_at >= DELTA_EVERY_S:
            self.flush()
            self._sent_at = now

    def flush(self) -> None:
        if self._held:
            self._channel.send({"op": "delta", "id": self._rid, "text": "".join(self._held)})
            self._held.clear()


class _Done:
    """One generation's replies: its deltas, then the ``done`` (or ``error``) frame."""

    def __init__(self, channel: _Channel, rid: int) -> None:
        self.channel, self.rid = channel, rid
        self.started = time.perf_counter()
        self.deltas = _Deltas(channel, rid)

    def frame(self, result: Completion) -> dict[str, Any]:
        """The ``done`` frame's fields, once the last text went out."""
        self.deltas.flush()
        first = self.deltas.first_at
        return {"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "ttft_ms": round((first - self.started) * 1000, 3) if first is not None
                else None}

    def finished(self, outcome: Completion | BaseException) -> None:
        """From the decoding thread: the generation ended (see :meth:`Backend.submit`)."""
        if isinstance(outcome, BaseException):
            self.deltas.flush()
            self.channel.send(_error_frame(self.rid, outcome))
        else:
            self.channel.send({"op": "done", "id": self.rid, **self.frame(outcome)})
        self.channel.cancelled.discard(self.rid)


class _WithAdapter(Backend):
    """A backend whose generations run with one LoRA adapter (an adapter's health check)."""

    def __init__(self, backend: Backend, adapter: str) -> None:
        self._backend, self._adapter = backend, adapter

    def info(self) -> dict[str, Any]:
        return self._backend.info()

    def complete(self, request: dict[str, Any], emit: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> Completion:
        return self._backend.complete({**request, "adapter": self._adapter}, emit, cancelled)


def _error_frame(rid: int | None, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, BadRequest):
        return {"op": "error", "id": rid, "status": exc.status, "code": exc.code,
                "message": str(exc)}
    # llama.cpp reports a failed decode (e.g. KV cache full) as a ValueError or RuntimeError.
    return {"op": "error", "id": rid, "status": 500, "code": "runtime_error",
            "message": f"{type(exc).__name__}: {exc}"}


def _start(backend: Backend, frame: dict[str, Any], channel: _Channel) -> None:
    """Hand a ``complete`` frame to the decoding thread; it answers by itself."""
    rid = frame["id"]
    done = _Done(channel, rid)
    backend.submit(frame["request"], done.deltas.emit, lambda: rid in channel.cancelled,
                   done.finished)


def _handle(backend: Backend, frame: dict[str, Any], channel: _Channel) -> dict[str, Any]:
    op, rid = frame["op"], frame["id"]
    if op == "check_prompt":
        adapter = frame.get("adapter")
        return run_prompt(_WithAdapter(backend, adapter) if adapter else backend, frame["item"])
    if op == "check_embeddings":
        return check_embeddings(backend, frame["health_check"])
    if op == "complete":
        done = _Done(channel, rid)
        result = backend.complete(frame["request"], done.deltas.emit,
                                  lambda: rid in channel.cancelled)
        return done.frame(result)
    if op == "embed":
        vectors, tokens = backend.embed(frame["input"])
        return {"embeddings": vectors, "prompt_tokens": tokens}
    if op == "infer":
        return {"outputs": backend.infer(frame["inputs"], frame.get("outputs"))}
    if op == "adapter_load":
        return backend.load_adapter(frame["name"], frame["path"], float(frame["scale"]))
    if op == "adapter_drop":
        return backend.drop_adapter(frame["name"])
    raise BadRequest(f"unknown op {op!r}", status=500, code="internal_error")


def serve(channel: _Channel) -> int:
    """Load the model the first frame names, then answer requests until stdin closes."""
    load = channel.requests.get()
    if load is None:
        return 0
    started = time.perf_counter()
    try:
        backend = load_backend(load["model"], load["format"], load["runtime"])
    except (ValueError, RuntimeError, OSError) as exc:
        channel.send({"op": "load_failed", "error": f"model does not load: {exc}"})
        return 0
    channel.send({"op": "ready", "load_ms": round((time.perf_counter() - started) * 1000, 1),
                  "info": backend.info()})
    while (frame := channel.requests.get()) is not None:
        rid = frame.get("id")
        try:
            if frame["op"] == "complete" and backend.slots:
                _start(backend, frame, channel)
                continue
            result = _handle(backend, frame, channel)
        except (BadRequest, ValueError, RuntimeError) as exc:
            channel.send(_error_frame(rid, exc))
        else:
            channel.send({"op": "done", "id": rid, **result})
        channel.cancelled.discard(rid)
    backend.close()
    _step_aside()
    return 0


def _step_aside() -> None:
    """Free the model at idle priority: the agent is done with this worker.

    A retired worker exits while its successor serves; tearing down the
    model takes a core for a moment, and beside llama.cpp's spinning thread
    pool that moment would slow the successor's next request severalfold.
    Lowering one's own priority needs no privilege (raising it would).
    """
    try:
        tasks = os.listdir("/proc/self/task")
        for tid in tasks:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError, ValueError):
        pass  # not Linux, or a thread just ended: exit at normal priority


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[--parent PID]``; frames on stdin, replies on stdout."""
    die_with(parent_from(sys.argv[1:] if argv is None else argv))
    # Keep fd 1 for replies alone: anything native code prints goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    return serve(_Channel(out_fd))


if __name__ == "__main__":
    sys.exit(main())
