"""A real LoRA adapter on the real SmolLM2 in real workers: checked, activated without
reloading the base, named per request, listed, never batched with the base, removed."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.inference.adapters import activate_adapter, check_adapter, remove_adapter
from agent.inference.spec import AdapterSpec, ModelSpec
from agent.inference.supervisor import Worker
from agent.runtime_settings import EffectiveRuntime
from tests.support.adapters import BuiltAdapter, built_adapter
from tests.support.inference import in_process_models

BASE = "smollm2-135m"
pytestmark = pytest.mark.integration


def _sync(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (fixtures pass through by name)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture(scope="module")
def adapter(model_path: Path) -> BuiltAdapter:
    return built_adapter(model_path)


def _base(path: Path, sha256: str, parallel: int = 2) -> ModelSpec:
    runtime = EffectiveRuntime(threads=1, gpu_layers=0, batch=None, context=512, mmap=True,
                               embeddings=False, parallel=parallel)
    return ModelSpec(f"{BASE}@1.1.0-micro", BASE, "1.1.0", "gguf", path, runtime, sha256)


def _spec(adapter: BuiltAdapter, version: str = "1.0.0", base_sha: str | None = None,
          path: Path | None = None) -> AdapterSpec:
    return AdapterSpec("support-formal", version, BASE, base_sha or adapter.base_sha256,
                       path or adapter.path, 1.0, adapter.sha256)


def _golden(adapter: BuiltAdapter) -> dict:
    return {"golden_prompts": [{"prompt": adapter.prompt, "expected": [adapter.expected],
                                "max_tokens": 16}], "max_ttft_ms": 10_000.0}


async def _ask(client: httpx.AsyncClient, model: str, prompt: str) -> tuple[int, str]:
    response = await client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": 12}, timeout=120)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, response.json()["choices"][0]["message"]["content"]


def test_the_built_adapter_changes_the_greedy_answer(adapter: BuiltAdapter) -> None:
    assert adapter.expected.lower() in adapter.answer_adapted.lower()
    assert adapter.expected.lower() not in adapter.answer_base.lower()
    assert 100_000 < adapter.size_bytes < 8 << 20  # megabytes, not the model's hundred


@_sync
async def test_adapter_serves_beside_its_base(model_path: Path, adapter: BuiltAdapter) -> None:
    spec = _base(model_path, adapter.base_sha256)
    async with in_process_models([spec]) as (runtime, url):
        slot = runtime.hosts[BASE].serving
        pid = slot.worker.pid
        result = await check_adapter(runtime, _spec(adapter), _golden(adapter))
        assert result["passed"], result
        assert await activate_adapter(runtime, _spec(adapter)) is None
        assert slot.worker.pid == pid  # the base was not loaded again
        async with httpx.AsyncClient(base_url=url) as client:
            status, with_adapter = await _ask(client, f"{BASE}+support-formal", adapter.prompt)
            assert status == 200 and adapter.expected.lower() in with_adapter.lower()
            status, without = await _ask(client, BASE, adapter.prompt)
            assert status == 200 and adapter.expected.lower() not in without.lower()

            # Both at once, several times: they take turns and never mix.
            asks = [_ask(client, f"{BASE}+support-formal" if i % 2 else BASE, adapter.prompt)
                    for i in range(6)]
            for i, (status, text) in enumerate(await asyncio.gather(*asks)):
                assert status == 200
                assert (adapter.expected.lower() in text.lower()) == bool(i % 2), (i, text)

            models = (await client.get("/v1/models")).json()["data"]
            listed = {m["id"]: m for m in models}
            assert listed[f"{BASE}+support-formal"]["adapter_of"] == f"{BASE}@1.1.0"
            assert listed[f"{BASE}+support-formal"]["format"] == "gguf-lora"
            tags = (await client.get("/api/tags")).json()["models"]
            tag = next(t for t in tags if t["name"] == f"{BASE}+support-formal:latest")
            assert tag["digest"] == adapter.sha256 and tag["size"] == adapter.size_bytes
            response = await client.post("/api/chat", json={
                "model": f"{BASE}+support-formal", "stream": False,
                "messages": [{"role": "user", "content": adapter.prompt}],
                "options": {"temperature": 0, "num_predict": 12}}, timeout=120)
            assert response.status_code == 200
            assert adapter.expected.lower() in response.json()["message"]["content"].lower()

            status, text = await _ask(client, f"{BASE}+nope", adapter.prompt)
            assert status == 404 and "nope" in text

            assert await remove_adapter(runtime, "support-formal")
            status, text = await _ask(client, f"{BASE}+support-formal", adapter.prompt)
            assert status == 404
            status, without = await _ask(client, BASE, adapter.prompt)
            assert status == 200 and adapter.expected.lower() not in without.lower()
            assert slot.worker.pid == pid


@_sync
async def test_adapter_for_another_base_build_is_not_served(model_path: Path,
                                                            adapter: BuiltAdapter) -> None:
    spec = _base(model_path, adapter.base_sha256, parallel=1)
    async with in_process_models([spec]) as (runtime, _):
        other = _spec(adapter, base_sha="0" * 64)
        result = await check_adapter(runtime, other, _golden(adapter))
        assert not result["passed"] and result["reasons"][0].startswith("base_mismatch")
        why = await activate_adapter(runtime, other)
        assert why is not None and why.startswith("base_mismatch")
        assert runtime.hosts[BASE].serving.adapters == {}


@_sync
async def test_a_file_that_is_not_an_adapter_fails_its_check(tmp_path: Path, model_path: Path,
                                                             adapter: BuiltAdapter) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(4096))
    spec = _base(model_path, adapter.base_sha256, parallel=1)
    async with in_process_models([spec]) as (runtime, url):
        result = await check_adapter(runtime, _spec(adapter, path=junk), _golden(adapter))
        assert not result["passed"] and "does not load" in result["reasons"][0]
        async with httpx.AsyncClient(base_url=url) as client:
            status, _ = await _ask(client, BASE, adapter.prompt)
            assert status == 200  # the base serves on


@_sync
async def test_applying_an_adapter_is_faster_than_loading_the_base(
        model_path: Path, adapter: BuiltAdapter) -> None:
    """Figures for docs/benchmarks.md come from bench/update.py; this checks the order only."""
    spec = _base(model_path, adapter.base_sha256, parallel=1)
    async with in_process_models([spec]) as (runtime, _):
        worker = runtime.hosts[BASE].serving.worker
        loaded = await worker.call("adapter_load", _spec(adapter).load_payload())
        assert loaded["adapters"] == ["support-formal@1.0.0"]
        fresh = Worker(spec)
        try:
            ready = await fresh.start(120)
        finally:
            await fresh.stop()
        assert 0 < loaded["load_ms"] < ready["load_ms"]
