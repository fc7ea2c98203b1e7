"""Several models on one device: routing, the loaded-model cap and LRU, keep_alive,
warm swap and crashes per model, removal.

The runtime and its local API run in the test's event loop; every model runs
in a real worker subprocess: the real SmolLM2 GGUF for chat (and, with
``embeddings: true``, as an embedder), the ONNX embedder built with
onnx.helper. Requests go through the official ``openai`` and ``ollama``
clients, or raw HTTP where a client hides what is checked.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from agent.inference.runtime import InferenceRuntime, NoModel, RuntimeLimits
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from tests.support.inference import in_process_models, worker_pids, write_onnx_embedder

pytestmark = pytest.mark.integration

CHAT, EMB = "smollm2-135m", "minilm"
HELLO = [{"role": "user", "content": "Say hello"}]
CHECK = {"golden_prompts": [{"prompt": "What is 2 + 2?", "expected": ["4", "four"],
                             "max_tokens": 16}],
         "max_ttft_ms": 60_000.0, "min_tokens_per_s": 1.0}


def _gguf(path: Path, name: str = CHAT, version: str = "1.0.0",
          embeddings: bool = False) -> ModelSpec:
    runtime = EffectiveRuntime(threads=1, gpu_layers=0, batch=None, context=512, mmap=True,
                               embeddings=embeddings)
    return ModelSpec(f"{name}@{version}-micro", name, version, "gguf", path, runtime)


def _onnx(path: Path, name: str = EMB, version: str = "1.0.0",
          embeddings: bool = True) -> ModelSpec:
    runtime = EffectiveRuntime(threads=1, gpu_layers=0, batch=None, context=512, mmap=True,
                               embeddings=embeddings, onnx_providers=("CPUExecutionProvider",))
    return ModelSpec(f"{name}@{version}-micro", name, version, "onnx", path, runtime)


@pytest.fixture
def embedder(tmp_path: Path) -> Path:
    path = tmp_path / "embedder.onnx"
    write_onnx_embedder(path)
    return path


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one series of ``/metrics`` (0 when it is absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120,
                              max_retries=0)


async def _embed(client: openai.AsyncOpenAI, texts: str | list[str]) -> Any:
    # The client's default: it asks for base64 and decodes it itself.
    return await client.embeddings.create(model=EMB, input=texts)


def test_two_models_serve_at_once_through_the_openai_client(model_path: Path) -> None:
    async def scenario() -> None:
        specs = [_gguf(model_path), _gguf(model_path, name=EMB, embeddings=True)]
        async with in_process_models(specs) as (_runtime, url):
            client = _client(url)
            chats = [client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8,
                                                    temperature=0) for _ in range(3)]
            embeds = [_embed(client, [f"text {i}", "other"]) for i in range(3)]
            answers = await asyncio.gather(*chats, *embeds)
            for chat in answers[:3]:
                assert chat.model == f"{CHAT}@1.0.0" and chat.choices[0].message.content
            for emb in answers[3:]:
                assert emb.model == f"{EMB}@1.0.0" and len(emb.data) == 2
                vector = emb.data[0].embedding  # per token: the GGUF names no pooling
                assert len(vector[0] if isinstance(vector[0], list) else vector) == 576

            listed = {m.id: m for m in (await client.models.list()).data}
            assert set(listed) == {CHAT, EMB}
            assert all(m.model_extra["loaded"] for m in listed.values())
            assert listed[EMB].model_extra["embeddings"] is True
            assert len(worker_pids(os.getpid())) == 2
            async with httpx.AsyncClient(base_url=url) as http:
                health = (await http.get("/healthz")).json()
            assert health["status"] == "ok" and set(health["models"]) == {CHAT, EMB}
            assert health["models"][EMB] == {"status": "ok", "version": "1.0.0",
                                             "loaded": True, "queue_depth": 0}

    asyncio.run(scenario())



def test_base64_embeddings_are_the_float_ones(model_path: Path) -> None:
    """The official client's default (base64 float32) decodes to the float answer."""
    async def scenario() -> None:
        specs = [_gguf(model_path), _gguf(model_path, name=EMB, embeddings=True)]
        async with in_process_models(specs) as (_runtime, url):
            client = _client(url)
            texts = ["a kiosk", "a plant floor"]
            packed = await _embed(client, texts)
            floats = await client.embeddings.create(model=EMB, input=texts,
                                                    encoding_format="float")
            for a, b in zip(packed.data, floats.data, strict=True):
                assert len(a.embedding) == len(b.embedding) > 8
                assert a.embedding == pytest.approx(b.embedding, rel=1e-6, abs=1e-7)

    asyncio.run(scenario())

def test_an_unknown_model_is_404_naming_those_served(model_path: Path, embedder: Path) -> None:
    async def scenario() -> None:
        async with in_process_models([_gguf(model_path), _onnx(embedder)]) as (runtime, url):
            client = _client(url)
            for model in ("llama3.2", f"{CHAT}@9.9.9"):
                with pytest.raises(openai.NotFoundError) as err:
                    await client.chat.completions.create(model=model, messages=HELLO)
                error = err.value.body
                assert error["code"] == "model_not_found" and error["param"] == "model"
                assert f"'{CHAT}' ({CHAT}@1.0.0)" in error["message"]
                assert f"'{EMB}' ({EMB}@1.0.0)" in error["message"], error
            with pytest.raises(NoModel, match=f"'{EMB}'"):
                runtime.resolve("nothing")
            assert runtime.resolve(f"{EMB}@1.0.0").spec.name == EMB

    asyncio.run(scenario())


def test_with_a_cap_of_one_alternating_models_unload_and_reload(
        model_path: Path, embedder: Path) -> None:
    async def scenario() -> None:
        limits = RuntimeLimits(max_loaded=1)
        async with in_process_models([_gguf(model_path), _onnx(embedder)], limits) as (
                runtime, url):
            client = _client(url)
            models = {m.id: m.model_extra["loaded"] for m in (await client.models.list()).data}
            assert models == {CHAT: True, EMB: False}, "the second waits for its first request"
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.get("/healthz")).status_code == 200
            for _ in range(3):
                chat = await client.chat.completions.create(model=CHAT, messages=HELLO,
                                                            max_tokens=4, temperature=0)
                assert chat.choices[0].message.content
                emb = await _embed(client, "hello")
                assert len(emb.data[0].embedding) == 8
                assert len(worker_pids(os.getpid())) == 1, "never two loaded at once"
            async with httpx.AsyncClient(base_url=url) as http:
                text = (await http.get("/metrics")).text
            chat_v = {"model": CHAT, "version": "1.0.0"}
            emb_v = {"model": EMB, "version": "1.0.0"}
            # chat: loaded at start, then again after each embedding request
            assert _metric(text, "slmfleet_model_loads_total", **chat_v) == 3
            assert _metric(text, "slmfleet_model_loads_total", **emb_v) == 3
            assert _metric(text, "slmfleet_model_unloads_total", reason="lru", **chat_v) == 3
            assert _metric(text, "slmfleet_model_unloads_total", reason="lru", **emb_v) == 2
            assert _metric(text, "slmfleet_model_load_seconds_total", **chat_v) > 0
            assert _metric(text, "slmfleet_model_loaded", **emb_v) == 1
            assert _metric(text, "slmfleet_model_loaded", **chat_v) == 0
            assert _metric(text, "slmfleet_inference_requests_total", outcome="ok",
                           **chat_v) == 3

            beats = {s.model: s for s in runtime.telemetry()}
            assert beats[CHAT].requests == 3 and beats[EMB].requests == 3
            if "loads" in type(beats[CHAT]).model_fields:
                assert beats[CHAT].loads == 3 and beats[CHAT].load_ms > 0

    asyncio.run(scenario())


def test_a_busy_model_is_not_unloaded_the_load_waits_for_it(
        model_path: Path, embedder: Path) -> None:
    """Cap of one: a request for the other model waits while the loaded one answers,
    then both succeed (the busy model was never cut off)."""
    async def scenario() -> None:
        async with _story_running(model_path, embedder, RuntimeLimits(max_loaded=1)) as (
                _runtime, _url, client, long):
            emb = await _embed(client, "hello")
            assert long.done(), "the embedder loaded only once the chat model was idle"
            assert (await long).choices[0].text
            assert len(emb.data[0].embedding) == 8

    asyncio.run(scenario())


@asynccontextmanager
async def _story_running(model_path: Path, embedder: Path, limits: RuntimeLimits | None = None
                         ) -> AsyncIterator[tuple[InferenceRuntime, str, openai.AsyncOpenAI,
                                                  asyncio.Task[Any]]]:
    """The chat model and the embedder served, and a chat request running (a story of
    up to 64 tokens): yields the runtime, the API's URL, a client and the request."""
    async with in_process_models([_gguf(model_path), _onnx(embedder)], limits) as (
            runtime, url):
        client = _client(url)
        long = asyncio.create_task(client.completions.create(
            model=CHAT, prompt="Once upon a time", max_tokens=64, temperature=0))
        await _until(lambda: _busy(runtime, CHAT), 60, "the chat request to run")
        yield runtime, url, client, long


async def _busy(runtime: InferenceRuntime, name: str) -> bool:
    slot = runtime.hosts[name].serving
    return slot is not None and slot.stats.busy > 0 and slot.loaded


def test_keep_alive_through_the_ollama_client(model_path: Path, embedder: Path) -> None:
    async def scenario() -> None:
        async with in_process_models([_gguf(model_path), _onnx(embedder)]) as (_runtime, url):
            client = ollama.AsyncClient(host=url)

            async def loaded() -> list[str]:
                return [m.model for m in (await client.ps()).models]

            assert sorted(await loaded()) == [f"{EMB}:1.0.0", f"{CHAT}:1.0.0"]
            assert {m.model for m in (await client.list()).models} >= {
                f"{CHAT}:1.0.0", f"{EMB}:1.0.0", f"{CHAT}:latest"}

            reply = await client.generate(model=CHAT, prompt="Hi", keep_alive=0,
                                          options={"num_predict": 2})
            assert reply.done and reply.response
            await _until(lambda: _without(loaded, f"{CHAT}:1.0.0"), 30, "the unload")
            assert await loaded() == [f"{EMB}:1.0.0"], "the other model stays"
            assert {m.model for m in (await client.list()).models} >= {f"{CHAT}:1.0.0"}

            # A load-only request loads it again, for as long as it asks.
            load = await client.generate(model=CHAT, keep_alive="10m")
            assert load.done_reason == "load"
            (shown,) = [m for m in (await client.ps()).models if m.model == f"{CHAT}:1.0.0"]
            left = shown.expires_at.timestamp() - time.time()
            assert 590 < left <= 600, shown.expires_at
            assert shown.size == model_path.stat().st_size and shown.size_vram == 0

            # A negative keep_alive keeps it; a load-only keep_alive 0 unloads it at once.
            await client.chat(model=CHAT, messages=HELLO, keep_alive=-1,
                              options={"num_predict": 1})
            (shown,) = [m for m in (await client.ps()).models if m.model == f"{CHAT}:1.0.0"]
            assert shown.expires_at.year > 2300
            unload = await client.generate(model=CHAT, keep_alive=0)
            assert unload.done_reason == "unload"
            assert await loaded() == [f"{EMB}:1.0.0"]

            # Embeddings honour it too; an unloaded model loads on demand.
            embedded = await client.embed(model=EMB, input="x", keep_alive="0s")
            assert len(embedded.embeddings[0]) == 8
            await _until(lambda: _without(loaded, f"{EMB}:1.0.0"), 30, "the embedder unload")
            reply = await client.chat(model=CHAT, messages=HELLO, options={"num_predict": 1})
            assert reply.message.content is not None and await loaded() == [f"{CHAT}:1.0.0"]

            async with httpx.AsyncClient(base_url=url) as http:
                text = (await http.get("/metrics")).text
                bad = await http.post("/api/generate", json={"model": CHAT, "prompt": "x",
                                                              "keep_alive": "5 minutes"})
            assert _metric(text, "slmfleet_model_unloads_total", model=CHAT,
                           reason="keep_alive") == 2
            assert bad.status_code == 400 and "'keep_alive' must be a duration" in bad.text

    asyncio.run(scenario())


async def _without(loaded: Callable[[], Awaitable[list[str]]], model: str) -> bool:
    return model not in await loaded()


def test_idle_models_unload_when_ram_is_short(model_path: Path, embedder: Path) -> None:
    """No cap, but MemAvailable (here a simulated figure) too small for a second model:
    the second is not loaded beside the first; its request unloads the idle first."""
    free = [1 << 40]

    async def scenario() -> None:
        async with in_process_models([_gguf(model_path)],
                                     mem_available=lambda: free[0]) as (runtime, url):
            free[0] = 1000
            await runtime.serve(_onnx(embedder))
            assert runtime.loaded_refs() == {f"{CHAT}@1.0.0"}
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                r = await http.post("/v1/embeddings", json={"model": EMB, "input": "x"})
                assert r.status_code == 200
                assert runtime.loaded_refs() == {f"{EMB}@1.0.0"}
                text = (await http.get("/metrics")).text
            assert _metric(text, "slmfleet_model_unloads_total", model=CHAT,
                           reason="memory") == 1

    asyncio.run(scenario())


def test_warm_swap_of_one_model_under_traffic_to_both(model_path: Path, embedder: Path) -> None:
    async def scenario() -> None:
        async with in_process_models([_gguf(model_path), _onnx(embedder)]) as (runtime, url):
            results: list[tuple[str, int, str]] = []
            stop = asyncio.Event()

            async def traffic(path: str, body: dict[str, Any]) -> None:
                async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                    while not stop.is_set():
                        r = await http.post(path, json=body)
                        results.append((body["model"], r.status_code,
                                        r.json().get("model", r.text)))

            emb = asyncio.create_task(traffic("/v1/embeddings", {"model": EMB, "input": "x"}))
            chat = asyncio.create_task(traffic("/v1/chat/completions", {
                "model": CHAT, "messages": HELLO, "max_tokens": 4, "temperature": 0}))
            await _until(lambda: _answered(results, CHAT, 2), 60, "chat traffic")
            result = await runtime.prepare(_gguf(model_path, version="1.1.0"), CHECK,
                                           asyncio.Event(), 180)
            assert result["passed"], result
            runtime.activated(_gguf(model_path, version="1.1.0"))
            swapped = len(results)
            await _until(lambda: _answered(results[swapped:], CHAT, 3), 60, "chat on 1.1.0")
            stop.set()
            await asyncio.gather(emb, chat)

            failed = [r for r in results if r[1] != 200]
            assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
            embedded = [r for r in results if r[0] == EMB]
            assert len(embedded) >= 5 and {r[2] for r in embedded} == {f"{EMB}@1.0.0"}
            # The one chat request running at the swap may finish on 1.0.0; none after it.
            chats = [r[2] for r in results[swapped:] if r[0] == CHAT][1:]
            assert chats and set(chats) == {f"{CHAT}@1.1.0"}, chats
            await _until(lambda: _workers(2), 30, "the old chat worker to stop")

    asyncio.run(scenario())


async def _answered(results: list[tuple[str, int, str]], model: str, n: int) -> bool:
    return sum(1 for r in results if r[0] == model) >= n


async def _workers(n: int) -> bool:
    return len(worker_pids(os.getpid())) == n


def test_a_crash_of_one_models_worker_never_fails_the_others(
        model_path: Path, embedder: Path) -> None:
    async def scenario() -> None:
        async with _story_running(model_path, embedder) as (runtime, _url, client, long):
            emb_worker = runtime.hosts[EMB].serving.worker
            os.kill(emb_worker.pid, signal.SIGKILL)
            chat = await long
            assert chat.choices[0].text, "the chat model never noticed"
            await _until(lambda: _restarted(runtime, emb_worker.pid), 60, "a new embedder")
            emb = await _embed(client, "x")
            assert len(emb.data[0].embedding) == 8
            crashes = {s.model: s.crashes for s in runtime.telemetry()}
            assert crashes == {CHAT: 0, EMB: 1}

    asyncio.run(scenario())


async def _restarted(runtime: InferenceRuntime, old_pid: int) -> bool:
    worker = runtime.hosts[EMB].serving.worker
    return worker is not None and worker.alive and worker.pid != old_pid


def test_removing_a_model_lets_its_running_request_finish(
        model_path: Path, embedder: Path) -> None:
    async def scenario() -> None:
        async with _story_running(model_path, embedder) as (runtime, url, client, long):
            removing = asyncio.create_task(runtime.remove(CHAT))
            await asyncio.sleep(0)
            with pytest.raises(openai.NotFoundError) as err:
                await client.chat.completions.create(model=CHAT, messages=HELLO)
            assert f"'{EMB}' ({EMB}@1.0.0)" in err.value.body["message"]
            assert not removing.done(), "the worker waits for the running request"
            chat = await long
            assert chat.choices[0].text and chat.usage.completion_tokens > 1
            await asyncio.wait_for(removing, 30)
            assert runtime.loaded_refs() == {f"{EMB}@1.0.0"}
            assert len(worker_pids(os.getpid())) == 1
            listed = [m.id for m in (await client.models.list()).data]
            assert listed == [EMB]
            emb = await _embed(client, "x")
            assert len(emb.data[0].embedding) == 8
            async with httpx.AsyncClient(base_url=url) as http:
                health = (await http.get("/healthz")).json()
            assert health["status"] == "ok" and list(health["models"]) == [EMB]

    asyncio.run(scenario())


def test_a_model_added_to_the_set_serves_once_activated(model_path: Path,
                                                         embedder: Path) -> None:
    """A new name's first version is checked beside the served model; until it is
    activated it is neither routed nor counted in /healthz, and a failed check
    leaves nothing behind."""
    check = {"golden_prompts": [], "max_ttft_ms": 5000.0, "min_tokens_per_s": 0.0}

    async def scenario() -> None:
        async with in_process_models([_gguf(model_path)]) as (runtime, url), \
                httpx.AsyncClient(base_url=url, timeout=60) as http:
            # Run as a text model, the graph fails its golden prompt.
            failed = await runtime.prepare(_onnx(embedder, embeddings=False), {
                **check, "golden_prompts": [{"prompt": "hi", "expected": ["x"], "max_tokens": 4}]},
                asyncio.Event(), 60)
            assert not failed["passed"] and "does not generate text" in failed["reasons"][0]
            assert runtime.loaded_refs() == {f"{CHAT}@1.0.0"}

            passed = await runtime.prepare(_onnx(embedder), check, asyncio.Event(), 60)
            assert passed["passed"], passed
            assert runtime.loaded_refs() == {f"{CHAT}@1.0.0", f"{EMB}@1.0.0"}
            health = await http.get("/healthz")
            assert health.status_code == 200 and list(health.json()["models"]) == [CHAT]
            r = await http.post("/v1/embeddings", json={"model": EMB, "input": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

            runtime.activated(_onnx(embedder))
            r = await http.post("/v1/embeddings", json={"model": EMB, "input": "x"})
            assert r.status_code == 200 and r.json()["model"] == f"{EMB}@1.0.0"
            listed = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
            assert listed == [CHAT, EMB]
            assert (await http.get("/healthz")).json()["status"] == "ok"

    asyncio.run(scenario())


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), ("0", 0.0), (300, 300.0), (2.5, 2.5), ("5m", 300.0),
    ("1h30m", 5400.0), ("300ms", 0.3), ("10s", 10.0), ("-1", float("inf")),
    (-1, float("inf")), ("-5m", float("inf")),
])
def test_keep_alive_reads_as_ollama_reads_it(value: Any, seconds: float | None) -> None:
    from agent.inference.ollama_shapes import keep_alive

    assert keep_alive({} if value is None else {"keep_alive": value}) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", "5x", True, [5], float("nan")])
def test_a_bad_keep_alive_is_400(value: Any) -> None:
    from agent.inference.ollama_shapes import OllamaError, keep_alive

    with pytest.raises(OllamaError) as err:
        keep_alive({"keep_alive": value})
    assert err.value.status == 400 and "'keep_alive' must be a duration" in str(err.value)


def test_the_agent_settings_bound_the_cap_and_the_keep_alive() -> None:
    from pydantic import ValidationError

    from agent.config import AgentConfig

    config = AgentConfig(device_id="dev-1", max_loaded_models=2, inference_keep_alive_s=600)
    assert (config.max_loaded_models, config.inference_keep_alive_s) == (2, 600.0)
    assert AgentConfig(device_id="dev-1").max_loaded_models == 0, "no cap unless set"
    for bad in ({"max_loaded_models": -1}, {"inference_keep_alive_s": -5}):
        with pytest.raises(ValidationError):
            AgentConfig(device_id="dev-1", **bad)
