"""ONNX in the inference worker: a real graph built with onnx.helper, real onnxruntime.

The runtime and its API run in the test's event loop, the model in a real
worker subprocess: generic inference by input and output name, mean-pooled
embeddings, the embedding health check, and execution-provider fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.inference.runtime import InferenceRuntime
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from tests.support.inference import in_process_api, write_onnx_embedder


def _spec(path: Path, version: str, embeddings: bool = True) -> ModelSpec:
    runtime = EffectiveRuntime(threads=1, gpu_layers=0, batch=None, context=512, mmap=True,
                               embeddings=embeddings,
                               onnx_providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    return ModelSpec(f"emb@{version}-micro", "emb", version, "onnx", path, runtime)


@asynccontextmanager
async def _serving(spec: ModelSpec) -> AsyncIterator[tuple[InferenceRuntime, httpx.AsyncClient]]:
    """``spec`` served by a runtime in this event loop, and a client of its local API."""
    async with in_process_api(spec) as (runtime, url), \
            httpx.AsyncClient(base_url=url, timeout=60) as client:
        yield runtime, client


def test_onnx_embeddings_generic_inference_and_health_check(tmp_path: Path) -> None:
    path = tmp_path / "embedder.onnx"
    table = np.asarray(write_onnx_embedder(path), dtype=np.float32)

    async def scenario() -> None:
        async with _serving(_spec(path, "1.0.0")) as (runtime, client):
            await check(runtime, client)

    async def check(runtime: InferenceRuntime, client: httpx.AsyncClient) -> None:
        info = runtime.serving.worker.info
        assert info["providers"] == ["CPUExecutionProvider"]
        assert "NoSuchExecutionProvider not available" in info["provider_fallback"]

        r = await client.post("/v1/embeddings", json={"model": "emb", "input": ["hi", "abc"]})
        assert r.status_code == 200, r.text
        body = r.json()
        for item, text in zip(body["data"], ["hi", "abc"], strict=True):
            expected = table[list(text.encode())].mean(axis=0)
            assert np.allclose(item["embedding"], expected, atol=1e-6)
        assert body["usage"]["prompt_tokens"] == 5 and body["model"] == "emb@1.0.0"

        r = await client.post("/v1/infer", json={
            "model": "emb", "inputs": {"input_ids": [[1, 2, 255]],
                                       "attention_mask": [[1, 1, 1]]},
            "outputs": ["last_hidden_state"]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]["last_hidden_state"]
        assert out["shape"] == [1, 3, 8] and out["dtype"] == "float32"
        assert np.allclose(out["data"][0], table[[1, 2, 255]])

        r = await client.post("/v1/infer", json={"model": "emb", "inputs": {"pixels": [[1]]}})
        assert r.status_code == 400 and "unknown inputs ['pixels']" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json={
            "model": "emb", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"

        # The health check runs in a second worker while the first keeps serving.
        spec = {"golden_prompts": [], "max_ttft_ms": 5000.0, "min_tokens_per_s": 0.0}
        result = await runtime.prepare(_spec(path, "1.1.0"), spec, asyncio.Event(), 60)
        assert result["passed"], result
        runtime.activated(_spec(path, "1.1.0"))
        r = await client.post("/v1/embeddings", json={"model": "emb", "input": "hi"})
        assert r.json()["model"] == "emb@1.1.0"

        generic = await runtime.prepare(
            _spec(path, "2.0.0", embeddings=False),
            {**spec, "golden_prompts": [{"prompt": "hi", "expected": ["x"], "max_tokens": 4}]},
            asyncio.Event(), 60)
        assert not generic["passed"] and "does not generate text" in generic["reasons"][0]
        assert runtime.serving.spec.version == "1.1.0", "a failed candidate changes nothing"

    asyncio.run(scenario())


def test_model_that_does_not_load_is_unavailable_not_fatal(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx graph")

    async def scenario() -> None:
        async with _serving(_spec(bad, "1.0.0")) as (_, client):
            r = await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
            assert "model does not load" in r.json()["error"]["message"]
            health = await client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"

    asyncio.run(scenario())


@pytest.mark.parametrize("body", [b"[1, 2]", b'{"model": 3, "input": "x"}'])
def test_embeddings_request_shape_errors(tmp_path: Path, body: bytes) -> None:
    from agent.inference.schemas import ApiError, Limits, embeddings_request, parse_json

    with pytest.raises(ApiError) as err:
        embeddings_request(parse_json(body), Limits())
    assert err.value.status == 400
