"""Reach a real agent's local inference API and its worker processes from a test."""

from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h11
import httpx
import psutil

import protocol as p
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support.http_artifacts import ArtifactServer
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator
from tests.support.updates import DeviceRig, seed_active, wait_for


@asynccontextmanager
async def in_process_api(spec: Any) -> AsyncIterator[tuple[Any, str]]:
    """``spec`` (a ModelSpec) served by a runtime in this event loop behind its local
    API: yields the runtime and the API's base URL, and stops both afterwards."""
    async with in_process_models([spec]) as served:
        yield served


@asynccontextmanager
async def in_process_models(specs: list[Any], limits: Any = None,
                            **runtime_extra: Any) -> AsyncIterator[tuple[Any, str]]:
    """Several ModelSpecs served at once by one runtime (``limits``: its
    RuntimeLimits; ``runtime_extra``: more InferenceRuntime arguments) behind
    its local API, as :func:`in_process_api`."""
    from agent.inference.api import ApiSettings, LocalApi
    from agent.inference.runtime import InferenceRuntime

    runtime = InferenceRuntime(limits, **runtime_extra)
    api = LocalApi(runtime, ApiSettings())
    try:
        for spec in specs:
            await runtime.serve(spec)
        await api.start()
        yield runtime, f"http://127.0.0.1:{api.port}"
    finally:
        await api.close()
        await runtime.close()


_API_LINE = re.compile(r"local API on (http://127\.0\.0\.1:\d+)")
WORKER_MODULE = "agent.inference.worker"


@contextmanager
def serving_rig(
    work: Path,
    broker: MosquittoBroker,
    cp_credentials: tuple[str, str],
    device_id: str,
    server: ArtifactServer,
    model_path: Path,
    model: str,
    **agent_extra: Any,
) -> Iterator[DeviceRig]:
    """A running agent whose local API (port 0) serves ``model_path`` as ``model``@1.0.0.

    ``agent_extra`` are agent settings; the device is enrolled on ``broker``
    and stopped (its assignment cleared) on exit.
    """
    rig = DeviceRig(work, broker, cp_credentials, device_id, provision_device(broker, device_id),
                    server, TrustSimulator(), api_port=0, **agent_extra)
    seed_active(rig.state_dir / "models", model, "1.0.0", model_path)
    rig.start()
    try:
        yield rig
    finally:
        rig.close()


def api_url(rig: DeviceRig, timeout: float = 30.0) -> str:
    """The agent's API base URL, from its log (the tests run it on port 0)."""
    assert rig.agent is not None

    def found() -> str | None:
        match = _API_LINE.search(rig.agent.log())
        return match.group(1) if match else None

    return wait_for(found, timeout, "the local API to listen")


def ready_url(rig: DeviceRig, timeout: float = 60.0) -> str:
    """The agent's API base URL once its model is loaded (``/healthz`` answers 200)."""
    base = api_url(rig)
    wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, timeout,
             "the model to load")
    return base


@contextmanager
def fresh_rig(
    work: Path,
    broker: MosquittoBroker,
    cp_credentials: tuple[str, str],
    device_prefix: str,
    model_path: Path,
    model: str,
    **agent_extra: Any,
) -> Iterator[DeviceRig]:
    """A fresh device serving ``model_path`` as ``model``, as :func:`serving_rig`.

    Its artifact server (empty until a test puts a release there) and state
    live under ``work``.
    """
    (work / "artifacts").mkdir()
    device_id = f"{device_prefix}-{secrets.token_hex(3)}"
    with (
        ArtifactServer(work / "artifacts") as server,
        serving_rig(work, broker, cp_credentials, device_id, server, model_path, model,
                    **agent_extra) as rig,
    ):
        yield rig


@contextmanager
def served_model(*args: Any, **kwargs: Any) -> Iterator[str]:
    """A :func:`fresh_rig` (same arguments); yields its API URL once the model is loaded."""
    with fresh_rig(*args, **kwargs) as rig:
        yield ready_url(rig)


def worker_pids(agent_pid: int) -> list[int]:
    """Pids of the agent's inference workers."""
    pids = []
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if WORKER_MODULE in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def telemetry(rig: DeviceRig) -> list[p.Telemetry]:
    """Every heartbeat the device published so far."""
    topic = p.device_topic(rig.device_id, p.TopicKind.TELEMETRY)
    return [p.decode(p.TopicKind.TELEMETRY, m.payload) for m in list(rig.cp.messages)
            if m.topic == topic and m.payload]


def write_onnx_embedder(path: Path, dim: int = 8) -> list[list[float]]:
    """A real ONNX graph: byte ids -> per-token vectors (Gather from a table).

    ``input_ids`` int64 (1, n), ``attention_mask`` int64 (1, n) ->
    ``last_hidden_state`` float (1, n, dim). Returns the table, so a test
    can compute the expected mean-pooled embedding itself.
    """
    import onnx
    from onnx import TensorProto, helper

    table = [[((i * 7 + j * 3) % 17) / 17.0 for j in range(dim)] for i in range(256)]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
        "byte-embedder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, "n", dim])],
        [helper.make_tensor("table", TensorProto.FLOAT, [256, dim],
                            [v for row in table for v in row])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return table


@dataclass
class LoadClient:
    """Sends chat requests back to back from a thread; bounded in count and time."""

    url: str
    model: str
    max_requests: int = 2000
    max_seconds: float = 240.0
    results: list[tuple[int, str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LoadClient:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(base_url=self.url, timeout=120) as client:
            for i in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                started = time.monotonic()
                try:
                    r = client.post("/v1/chat/completions", json={
                        "model": self.model, "max_tokens": 6, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Say hello ({i})"}]})
                    model = r.json().get("model", "") if r.status_code == 200 else r.text
                    self.results.append((r.status_code, model, time.monotonic() - started))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc), time.monotonic() - started))

    def stop(self) -> list[tuple[int, str, float]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=150)
        return self.results


class KeptAlive:
    """One HTTP/1.1 connection, reused for every request (no pool to second-guess it)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.conn = h11.Connection(h11.CLIENT)

    def get(self, path: str) -> tuple[int, Any]:
        """(status, a response with ``headers`` and ``body``) of ``GET path``."""
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        self.sock.sendall(self.conn.send(h11.Request(method="GET", target=path,
                                                     headers=[("host", "localhost")])))
        self.sock.sendall(self.conn.send(h11.EndOfMessage()))
        response, body = None, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                headers = {k.decode(): v.decode() for k, v in response.headers}
                return response.status_code, SimpleNamespace(headers=headers, body=body)
            else:
                raise AssertionError(f"unexpected {event!r}")

    def close(self) -> None:
        self.sock.close()
