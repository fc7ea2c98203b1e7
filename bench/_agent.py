"""The agent's runtime behind its real local API, for the inference benchmarks.

A real worker subprocess with the SmolLM2-135M GGUF; the API serves on
127.0.0.1 from the caller's event loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.inference.api import ApiSettings, LocalApi
from agent.inference.runtime import InferenceRuntime
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from controlplane.devfleet.model_cache import smollm2_path

MODEL = smollm2_path()
THREADS = int(os.environ.get("BENCH_THREADS", min(2, len(os.sched_getaffinity(0)))))
#: context per slot, for the agent and llama-server alike
CONTEXT = 2048


def spec(version: str, parallel: int | None = None) -> ModelSpec:
    """The benchmark's model at ``version`` with ``parallel`` slots (None: the default)."""
    settings: dict[str, object] = {"threads": THREADS, "gpu_layers": 0, "batch": None,
                                   "context": CONTEXT, "mmap": True, "embeddings": False}
    if parallel is not None:
        settings["parallel"] = parallel
    runtime = EffectiveRuntime(**settings)  # type: ignore[arg-type]
    return ModelSpec(f"smollm2@{version}-micro", "smollm2", version, "gguf", MODEL, runtime)


@contextlib.asynccontextmanager
async def serving(model: ModelSpec) -> AsyncIterator[tuple[InferenceRuntime, str]]:
    """Serve ``model`` until the block ends: yields the runtime and the API's base URL."""
    runtime = InferenceRuntime()
    api = LocalApi(runtime, ApiSettings())
    try:
        await runtime.serve(model)
        await api.start()
        yield runtime, f"http://127.0.0.1:{api.port}"
    finally:
        await api.close()
        await runtime.close()


def worker_pid(runtime: InferenceRuntime) -> int:
    """The pid of the worker serving now."""
    slot = runtime.serving
    if slot is None or slot.worker is None or slot.worker.pid is None:
        raise RuntimeError("no worker is serving")
    return slot.worker.pid
