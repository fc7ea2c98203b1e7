"""Warm swap under continuous load: a real agent, real Mosquitto, the real SmolLM2 GGUF.

A client sends chat requests back to back while the agent swaps
1.0.0 -> 1.1.0 (same weights, another release) and is then assigned a
variant that fails its health check: no request fails, and once 1.1.0 is
active every response reports it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import protocol as p
from agent.inference.runtime import InferenceRuntime, Unavailable
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import LoadClient, ready_url, serving_rig, worker_pids
from tests.support.updates import (
    FAILING_PROMPT,
    DeviceRig,
    link_or_copy,
    variant_for,
    wait_for,
)

pytestmark = pytest.mark.integration

GGUF = "smollm2.gguf"
MODEL = "smollm2-135m"


@pytest.fixture
def rig(tmp_path: Path, broker, cp_credentials, model_path: Path) -> Iterator[DeviceRig]:
    link_or_copy(model_path, tmp_path / "artifacts" / GGUF)
    device_id = f"swap-{secrets.token_hex(3)}"
    with (
        ArtifactServer(tmp_path / "artifacts") as server,
        serving_rig(tmp_path / device_id, broker, cp_credentials, device_id, server, model_path,
                    MODEL) as rig,
    ):
        yield rig


def test_warm_swap_under_load_fails_no_request(rig: DeviceRig) -> None:
    url = ready_url(rig)
    load = LoadClient(url, MODEL).start()
    try:
        wait_for(lambda: len(load.results) >= 3, 60, "steady traffic on 1.0.0")
        good = rig.release("1.1.0", variant_for(rig.server.directory / GGUF, GGUF))
        rig.publish(rig.assign(good, assignment_id="swap-good"))
        final = rig.wait_final("swap-good", timeout=180)
        assert final.type == p.EventType.ACTIVATED, final.reason
        swapped_at = len(load.results)
        wait_for(lambda: len(load.results) >= swapped_at + 3, 60, "traffic on 1.1.0")

        bad = rig.release("1.2.0", variant_for(rig.server.directory / GGUF, GGUF,
                                               prompts=[FAILING_PROMPT]))
        rig.publish(rig.assign(bad, assignment_id="swap-bad"))
        final = rig.wait_final("swap-bad", timeout=180)
        assert final.type == p.EventType.FAILED and final.reason.startswith("health_failed")
        after_bad = len(load.results)
        wait_for(lambda: len(load.results) >= after_bad + 3, 60, "traffic after the failure")
    finally:
        results = load.stop()

    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    models = [m for _, m, _ in results]
    assert models[0] == f"{MODEL}@1.0.0"
    # Requests answered after the activation event report the new version, never the old.
    assert set(models[swapped_at + 1:]) == {f"{MODEL}@1.1.0"}, models[swapped_at - 2:]
    assert f"{MODEL}@1.2.0" not in models
    assert rig.agent is not None
    wait_for(lambda: len(worker_pids(rig.agent.pid)) == 1, 20,
             "only the serving worker left (old and failed candidate stopped)")
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["version"] == "1.1.0"


def _llama_spec(path: Path, version: str) -> ModelSpec:
    runtime = EffectiveRuntime(threads=2, gpu_layers=0, batch=None, context=512, mmap=True,
                               embeddings=False)
    return ModelSpec(f"{MODEL}@{version}-micro", MODEL, version, "gguf", path, runtime)


def test_candidate_check_runs_only_while_the_serving_worker_is_idle(model_path: Path) -> None:
    """The candidate is frozen while a request runs on the serving worker, instead
    of running llama.cpp threads beside it (which slows both many-fold)."""
    check = {"golden_prompts": [{"prompt": "What is 2 + 2?", "expected": ["4", "four"],
                                 "max_tokens": 16}],
             "max_ttft_ms": 60_000.0, "min_tokens_per_s": 1.0}

    async def scenario() -> None:
        runtime = InferenceRuntime()
        await runtime.serve(_llama_spec(model_path, "1.0.0"))
        try:
            async with runtime.lease(MODEL):
                # The serving worker is busy with a request for as long as this block runs.
                prepare = asyncio.create_task(runtime.prepare(
                    _llama_spec(model_path, "1.1.0"), check, asyncio.Event(), 120))
                deadline = time.monotonic() + 60
                while len(worker_pids(os.getpid())) < 2:
                    assert time.monotonic() < deadline, "the candidate worker never started"
                    await asyncio.sleep(0.1)
                # Unfrozen, it would load and answer a 16-token prompt within
                # a second or two. It must still be waiting.
                await asyncio.sleep(4)
                assert not prepare.done(), "the candidate ran while the serving worker was busy"
            result = await asyncio.wait_for(prepare, 60)
            assert result["passed"], result
            assert result["prompts"][0]["matched"] in ("4", "four")
        finally:
            await runtime.close()

    asyncio.run(scenario())


def test_a_request_cut_short_by_the_agent_stopping_is_not_a_crash(model_path: Path) -> None:
    """Past the stop's drain, closing the runtime ends a running request with
    Unavailable (the agent is stopping), not WorkerExited (retry in a second)."""

    async def scenario() -> None:
        runtime = InferenceRuntime()
        await runtime.serve(_llama_spec(model_path, "1.0.0"))
        request = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
        first_token = asyncio.Event()

        async def generate() -> None:
            async with runtime.lease(MODEL) as (_slot, worker):
                await worker.call("complete", {"request": request},
                                  on_delta=lambda _text: first_token.set())

        running = asyncio.create_task(generate())
        try:
            await asyncio.wait_for(first_token.wait(), 60)
        finally:
            await runtime.close()
        with pytest.raises(Unavailable, match="the agent is stopping"):
            await asyncio.wait_for(running, 30)
        assert runtime.serving is not None and runtime.serving.stats.take().crashes == 0

    asyncio.run(scenario())
