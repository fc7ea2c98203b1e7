"""Structured output over many seeds: ``json_schema`` through the official ``openai`` client.

The agent's runtime (a real worker subprocess with the SmolLM2-135M GGUF)
behind its real local API, in this process's event loop on a thread; the
official synchronous ``openai`` client asks for the schema of
tests/support/structured.py (a string enum, an integer range, a nested
array with ``maxItems`` of strings with ``maxLength``) once per seed, with
the temperature varied by seed, streamed and not. Every answer must end
``stop`` and validate with ``jsonschema``.

Target: SEEDS/SEEDS valid in both modes. ``BENCH_SEEDS`` (default 50) and
``BENCH_THREADS`` change the run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai
from _common import report

from agent.inference.api import ApiSettings, LocalApi
from agent.inference.runtime import InferenceRuntime
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from controlplane.devfleet.model_cache import smollm2_path
from tests.support.structured import ask

SEEDS = int(os.environ.get("BENCH_SEEDS", 50))
THREADS = int(os.environ.get("BENCH_THREADS", min(2, len(os.sched_getaffinity(0)))))


def _serve(ready: threading.Event, port: list[int], stop: threading.Event) -> None:
    """The runtime and its API, in an event loop of their own (this thread)."""
    async def main() -> None:
        runtime_settings = EffectiveRuntime(threads=THREADS, gpu_layers=0, batch=None,
                                            context=2048, mmap=True, embeddings=False,
                                            onnx_providers=())
        spec = ModelSpec("smollm2-135m@1.0.0", "smollm2-135m", "1.0.0", "gguf",
                         smollm2_path(), runtime_settings)
        runtime = InferenceRuntime()
        api = LocalApi(runtime, ApiSettings())
        await runtime.serve(spec)
        await api.start()
        port.append(api.port)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await api.close()
        await runtime.close()

    asyncio.run(main())


def main() -> int:
    ready, stop, port = threading.Event(), threading.Event(), []
    server = threading.Thread(target=_serve, args=(ready, port, stop), daemon=True)
    server.start()
    if not ready.wait(120):
        print("the model did not load", file=sys.stderr)
        return 1
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port[0]}/v1", api_key="unused",
                           max_retries=0, timeout=300)
    figures: dict[str, float | int | str] = {"seeds": SEEDS, "threads": THREADS}
    ok = True
    for stream in (False, True):
        mode = "streamed" if stream else "plain"
        started = time.perf_counter()
        verdicts = [ask(client, "smollm2-135m", seed, stream) for seed in range(SEEDS)]
        failed = [v for v in verdicts if v.problem]
        for v in failed:
            print(f"{mode} seed {v.seed}: {v.problem}: {v.text!r}", file=sys.stderr)
        figures[f"{mode}_valid"] = f"{SEEDS - len(failed)}/{SEEDS}"
        figures[f"{mode}_s_per_answer"] = round((time.perf_counter() - started) / SEEDS, 2)
        ok = ok and not failed
    stop.set()
    server.join(30)
    report(figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
