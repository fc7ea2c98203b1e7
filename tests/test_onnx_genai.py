"""ONNX language models through onnxruntime-genai: the real SmolLM2-135M int4 build.

scripts/build-onnx-genai.sh builds the model folder from the GGUF the other
tests use; here it runs in a real worker subprocess behind the agent's
local API (in this test's event loop), and the official ``openai`` client,
httpx and Ollama's ``/api/chat`` talk to it: chat and text completions
streamed and not, the sampling fields, guided JSON and tool calls, refusals
that name the field, the health check, provider fallback, a crashed worker, and warm swaps
between the GGUF and the ONNX build under steady traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agent.inference.runtime import InferenceRuntime
from tests.support.genai import HEALTH_CHECK, MODEL, gguf_spec, onnx_spec
from tests.support.inference import LoadClient, in_process_api
from tests.support.structured import PROMPT, judge, response_format
from tests.support.updates import built_onnx_folder

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def onnx_model() -> Path:
    """The int4 ONNX SmolLM2 folder scripts/build-onnx-genai.sh built into the cache."""
    return built_onnx_folder()


def test_a_second_build_finds_the_cached_model_and_changes_nothing(onnx_model: Path) -> None:
    before = {f.name: f.stat().st_mtime_ns for f in onnx_model.iterdir()}
    started = time.monotonic()
    done = subprocess.run(["scripts/build-onnx-genai.sh"], capture_output=True, text=True,
                          timeout=120, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.splitlines()[-1] == str(onnx_model)
    assert "building" not in done.stderr, done.stderr
    assert time.monotonic() - started < 60
    assert {f.name: f.stat().st_mtime_ns for f in onnx_model.iterdir()} == before
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= set(before)


def _serve(spec: Any, check: Callable[[InferenceRuntime, str], Any]) -> None:
    """Serve ``spec`` behind the local API and run the blocking ``check(runtime, url)``
    in a thread, so the API keeps answering in this event loop meanwhile."""

    async def scenario() -> None:
        async with in_process_api(spec) as (runtime, url):
            assert runtime.serving is not None and runtime.serving.worker is not None
            await asyncio.to_thread(check, runtime, url)

    asyncio.run(scenario())


def _chat(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    """(text, finish_reason) of one chat request, streamed or not."""
    if not stream:
        reply = client.chat.completions.create(model=MODEL, **kwargs)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    parts, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_openai_client_chats_with_the_onnx_model(onnx_model: Path) -> None:
    def check(runtime: InferenceRuntime, url: str) -> None:
        info = runtime.serving.worker.info  # type: ignore[union-attr]
        assert info["runtime"] == "onnxruntime-genai" and info["providers"] == [
            "CPUExecutionProvider"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0,
                                               max_tokens=24)
        answer = reply.choices[0].message.content or ""
        assert "Paris" in answer, answer
        assert reply.model == f"{MODEL}@1.0.0"
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
        # Greedy decoding: the streamed answer is the same text, in pieces.
        streamed, finish = _chat(client, True, messages=FRANCE, temperature=0, max_tokens=24)
        assert streamed == answer and finish == reply.choices[0].finish_reason

        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["version"], m["format"]) for m in models] == [
            (MODEL, "1.0.0", "onnx")]

        # max_tokens ends the answer at exactly that many tokens.
        reply = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=5,
            messages=[{"role": "user", "content": "Write a long story about a dragon."}])
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        # stop: the answer ends before the stop string, which is not sent.
        text, finish = _chat(client, True, messages=FRANCE, temperature=0, max_tokens=24,
                             stop=["Paris"])
        assert finish == "stop" and "Paris" not in text and answer.startswith(text)
        # A seed makes a sampled answer repeatable; top_p narrows it.
        sampled = [_chat(client, False, messages=FRANCE, temperature=0.9, top_p=0.9,
                         seed=7, max_tokens=16)[0] for _ in range(2)]
        assert sampled[0] == sampled[1] and sampled[0]

        completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                               temperature=0, max_tokens=8)
        assert completion.choices[0].text.strip() and completion.model == f"{MODEL}@1.0.0"
        pieces = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8,
            stream=True) if c.choices]
        assert "".join(pieces) == completion.choices[0].text

        # Ollama's /api/chat runs the same generation.
        r = httpx.post(f"{url}/api/chat", timeout=60, json={
            "model": MODEL, "messages": FRANCE, "stream": False,
            "options": {"temperature": 0, "num_predict": 24}})
        assert r.status_code == 200 and r.json()["message"]["content"] == answer, r.text

        stats = {s.version: s for s in runtime.all_stats()}["1.0.0"]
        assert stats.requests_ok >= 8 and stats.completion_tokens > 0

    _serve(onnx_spec(onnx_model, "1.0.0"), check)


def test_guided_json_and_tool_calls_validate_and_unsupported_fields_are_refused(
        onnx_model: Path) -> None:
    def check(runtime: InferenceRuntime, url: str) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for seed, stream in ((1, False), (2, True), (3, False)):
            text, finish = _chat(client, stream, messages=[{"role": "user", "content": PROMPT}],
                                 seed=seed, temperature=0.7, max_tokens=160,
                                 response_format=response_format())
            verdict = judge(seed, text, finish)
            assert verdict.problem is None, verdict
        text, finish = _chat(client, False, messages=FRANCE, temperature=0, max_tokens=48,
                             response_format={"type": "json_object"})
        assert isinstance(json.loads(text), dict), text

        for field, value in (("frequency_penalty", 0.5), ("presence_penalty", -1.0)):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4,
                                               **{field: value})
            assert caught.value.code == "unsupported_parameter"
            assert field in caught.value.message
        tool = {"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": False}}}
        # Tool calls run under the envelope's schema, read as for a GGUF.
        reply = client.chat.completions.create(
            model=MODEL, tools=[tool], parallel_tool_calls=False, temperature=0, max_tokens=48,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        calls = reply.choices[0].message.tool_calls or []
        assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1, reply
        assert calls[0].function.name == "weather"
        assert set(json.loads(calls[0].function.arguments)) == {"city"}
        # tool_choice "none": the tools are not shown and the answer is text.
        reply = client.chat.completions.create(model=MODEL, messages=FRANCE, tools=[tool],
                                               tool_choice="none", temperature=0, max_tokens=24)
        assert "Paris" in (reply.choices[0].message.content or "")
        # A refusal loses nothing: the next request is answered.
        assert "Paris" in _chat(client, False, messages=FRANCE, temperature=0, max_tokens=24)[0]

    _serve(onnx_spec(onnx_model, "1.0.0"), check)


def test_health_check_provider_fallback_and_crash_recovery(onnx_model: Path) -> None:
    async def scenario() -> None:
        spec = onnx_spec(onnx_model, "1.0.0",
                         providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
        async with in_process_api(spec) as (runtime, url):
            info = runtime.serving.worker.info  # type: ignore[union-attr]
            assert info["providers"] == ["CPUExecutionProvider"]
            assert "NoSuchExecutionProvider not available" in info["provider_fallback"]

            # The golden prompts run in a second worker, on the backend that then serves.
            result = await runtime.prepare(onnx_spec(onnx_model, "1.1.0"), HEALTH_CHECK,
                                           asyncio.Event(), 120)
            assert result["passed"], result
            assert result["tokens_per_s"] and result["ttft_ms_max"] is not None
            assert "H2O" in result["prompts"][0]["answer"]
            runtime.activated(onnx_spec(onnx_model, "1.1.0"))

            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                body = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 16}
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.json()["model"] == f"{MODEL}@1.1.0"
                # A native crash takes the worker, not the agent: the next request is served.
                pid = runtime.serving.worker.pid  # type: ignore[union-attr]
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                for _ in range(60):
                    r = await client.post("/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        break
                    await asyncio.sleep(0.5)
                assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"][
                    "content"]
                stats = {s.version: s for s in runtime.all_stats()}["1.1.0"]
                assert stats.crashes == 1 and runtime.serving.worker.pid != pid  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_warm_swap_gguf_to_onnx_and_back_fails_no_request(onnx_model: Path,
                                                          model_path: Path) -> None:
    async def scenario() -> None:
        async with in_process_api(gguf_spec(model_path, "1.0.0")) as (runtime, url):
            load = LoadClient(url, MODEL, max_seconds=200).start()
            try:
                await _until(lambda: len(load.results) >= 3, "traffic on the GGUF")
                for spec in (onnx_spec(onnx_model, "2.0.0"), gguf_spec(model_path, "3.0.0")):
                    result = await runtime.prepare(spec, HEALTH_CHECK, asyncio.Event(), 120)
                    assert result["passed"], result
                    runtime.activated(spec)
                    at = len(load.results)
                    await _until(lambda at=at, ref=spec.ref: sum(
                        m == ref for _, m, _ in load.results[at:]) >= 3, f"traffic on {spec.ref}")
            finally:
                results = await asyncio.to_thread(load.stop)
        failed = [r for r in results if r[0] != 200]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
        order = [m for _, m, _ in results]
        # Each version answers in one run, in order: once swapped, never the old one again.
        runs = [m for i, m in enumerate(order) if i == 0 or m != order[i - 1]]
        assert runs == [f"{MODEL}@1.0.0", f"{MODEL}@2.0.0", f"{MODEL}@3.0.0"], runs

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Wait (without blocking the event loop) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def test_a_provider_onnxruntime_genai_cannot_run_falls_back_to_cpu(
        onnx_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime lists a provider that this onnxruntime-genai build cannot load (CUDA,
    named for a provider onnxruntime has here): the model runs on the CPU, with the reason,
    and the folder is left as it was."""
    import onnxruntime as ort

    from agent.inference import genai_backend

    listed = next(p for p in ort.get_available_providers() if p != "CPUExecutionProvider")
    monkeypatch.setitem(genai_backend.GENAI_PROVIDERS, listed, "cuda")
    before = {f.name: f.stat().st_mtime_ns for f in onnx_model.iterdir()}
    backend = genai_backend.GenaiBackend(str(onnx_model), {
        "threads": 1, "context": 512, "embeddings": False,
        "onnx_providers": [listed, "CPUExecutionProvider"]})
    try:
        info = backend.info()
        assert info["providers"] == ["CPUExecutionProvider"]
        assert f"onnxruntime-genai cannot run on {listed}" in info["provider_fallback"]
        pieces: list[str] = []
        backend.complete({"messages": [{"role": "user", "content": "What is the chemical "
                                        "symbol for water?"}], "temperature": 0,
                          "max_tokens": 12}, pieces.append, lambda: False)
        assert "H2O" in "".join(pieces)
    finally:
        backend.close()
    assert {f.name: f.stat().st_mtime_ns for f in onnx_model.iterdir()} == before
