"""Ollama's API on the agent, driven by Ollama's official Python client.

A real agent process serves the real SmolLM2-135M GGUF, its local API on
one port and Ollama's routes also on a second (``ollama_port``); the
embedding routes run against the same GGUF loaded as an embedder by a
runtime in the test's event loop (an agent serves what its release says,
and the seeded test release is a chat model).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest

from agent.inference import ollama_fields
from agent.inference import ollama_shapes as shapes
from agent.inference.ollama_api import MANAGED, OLLAMA_VERSION
from agent.inference.ollama_fields import FIELDS, OPTIONS
from agent.inference.ollama_shapes import resolve_name
from agent.inference.schemas import Limits
from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from tests.support.agents import AgentProcess, write_agent_config
from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import in_process_api, ready_url, serving_rig, worker_pids
from tests.support.updates import DeviceRig, wait_for

MODEL = "smollm2-135m"
VERSION = "1.0.0"
SHOWN = f"{MODEL}:{VERSION}"
_OLLAMA_LINE = re.compile(r"Ollama API also on (http://127\.0\.0\.1:\d+)")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "inference.md"

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the chemical symbol for water?"}]


@pytest.fixture(scope="module")
def rig(tmp_path_factory, broker, cp_credentials, model_path: Path) -> Iterator[DeviceRig]:
    work = tmp_path_factory.mktemp("ollama-api")
    (work / "artifacts").mkdir()
    with (
        ArtifactServer(work / "artifacts") as server,
        serving_rig(work, broker, cp_credentials, f"oll-{secrets.token_hex(3)}", server,
                    model_path, MODEL, ollama_port=0, api_max_prompt_chars=4000) as rig,
    ):
        yield rig


@pytest.fixture(scope="module")
def url(rig: DeviceRig) -> str:
    """The agent's main API URL, once the model is loaded."""
    return ready_url(rig)


@pytest.fixture(scope="module")
def ollama_url(rig: DeviceRig, url: str) -> str:
    """The second listener, on ``ollama_port`` (0 here: a free port, from the log)."""
    assert rig.agent is not None

    def found() -> str | None:
        match = _OLLAMA_LINE.search(rig.agent.log())
        return match.group(1) if match else None

    return wait_for(found, 30, "the Ollama listener")


@pytest.fixture(scope="module")
def client(ollama_url: str) -> ollama.Client:
    return ollama.Client(host=ollama_url, timeout=180)


pytestmark = pytest.mark.integration


def test_list_show_ps_describe_the_served_gguf(client: ollama.Client, ollama_url: str,
                                               model_path: Path) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {f"{MODEL}:latest", SHOWN}
    entry = listed[SHOWN]
    assert entry.size == model_path.stat().st_size and len(entry.digest) == 64
    details = entry.details
    assert (details.format, details.family, details.parameter_size,
            details.quantization_level) == ("gguf", "llama", "135M", "Q4_1")

    shown = client.show(MODEL)
    assert "<|im_start|>" in shown.template and shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # arrays only when verbose
    assert len(client.show(MODEL).modelinfo) == len(shown.modelinfo)
    verbose = httpx.post(f"{ollama_url}/api/show",
                         json={"model": SHOWN, "verbose": True}, timeout=30).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152
    assert "num_ctx" in shown.parameters and shown.license == "apache-2.0"

    running = client.ps().models
    assert [m.model for m in running] == [SHOWN]
    assert running[0].context_length and running[0].context_length > 0
    assert running[0].expires_at is not None and running[0].expires_at.year > 2100


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=ASK, options={"temperature": 0,
                                                            "num_predict": 24})
    assert reply.model == SHOWN and reply.done and reply.done_reason in ("stop", "length")
    assert reply.message.role == "assistant" and "h2o" in reply.message.content.lower()
    assert reply.prompt_eval_count > 5 and 0 < reply.eval_count <= 24
    assert reply.total_duration >= reply.eval_duration > 0
    assert reply.prompt_eval_duration > 0 and reply.load_duration >= 0

    parts = list(client.chat(model=MODEL, messages=ASK, stream=True,
                             options={"temperature": 0, "num_predict": 24}))
    *pieces, last = parts
    assert pieces and all(not p.done for p in pieces) and last.done
    assert last.message.content == "" and last.eval_count == reply.eval_count
    assert "".join(p.message.content for p in pieces) == reply.message.content


def test_stream_is_ndjson_by_default(ollama_url: str) -> None:
    with httpx.stream("POST", f"{ollama_url}/api/generate", timeout=120, json={
            "model": MODEL, "prompt": "Say hi", "options": {"num_predict": 4,
                                                            "temperature": 0}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 4
    assert "".join(line["response"] for line in lines[:-1]).strip()
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_duration"} <= set(lines[-1])


def test_chat_with_a_json_schema_format_answers_valid_json(client: ollama.Client) -> None:
    ask = [{"role": "user", "content": "Describe a person named Ann, aged 30, as JSON."}]
    reply = client.chat(model=MODEL, messages=ask, format=PERSON,
                        options={"temperature": 0, "num_predict": 64})
    assert reply.done_reason == "stop", reply
    jsonschema.validate(json.loads(reply.message.content), PERSON)

    streamed = list(client.chat(model=MODEL, messages=ask, format=PERSON, stream=True,
                                options={"temperature": 0, "num_predict": 64}))
    text = "".join(p.message.content for p in streamed)
    assert streamed[-1].done_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)

    loose = client.generate(model=MODEL, prompt="A JSON object about a cat:", format="json",
                            options={"temperature": 0, "num_predict": 48})
    if loose.done_reason == "stop":
        assert isinstance(json.loads(loose.response), dict)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


def test_chat_with_tools_answers_text_or_valid_calls_and_reads_tool_results(
        client: ollama.Client) -> None:
    # Ollama has no tool_choice: the model picks text or calls (a 135M model mostly
    # picks text); whichever it picks must be well formed.
    ask = [{"role": "system", "content": "Call get_weather to learn the weather."},
           {"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    for stream in (False, True):
        options = {"temperature": 0.7, "seed": 3, "num_predict": 96}
        if stream:
            parts = list(client.chat(model=MODEL, messages=ask, tools=[WEATHER_TOOL],
                                     stream=True, options=options))
            assert parts[-1].done and parts[-1].done_reason == "stop", parts[-1]
            content = "".join(p.message.content for p in parts)
            calls = [c for p in parts for c in (p.message.tool_calls or [])]
        else:
            reply = client.chat(model=MODEL, messages=ask, tools=[WEATHER_TOOL],
                                options=options)
            assert reply.done_reason == "stop", reply
            content, calls = reply.message.content, reply.message.tool_calls or []
        assert not content.startswith('{"'), content  # never the envelope itself
        assert calls or content.strip()
        for call in calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(dict(call.function.arguments),
                                WEATHER_TOOL["function"]["parameters"])

    follow_up = [
        *ask,
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather",
                                      "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 degrees and sunny"}]
    reply = client.chat(model=MODEL, messages=follow_up, options={"temperature": 0,
                                                                  "num_predict": 48})
    assert reply.done and not reply.message.tool_calls and reply.message.content.strip()


def test_answers_with_calls_take_ollamas_shape() -> None:
    asked = shapes.chat_request({"model": MODEL, "messages": ASK, "tools": [WEATHER_TOOL]},
                                Limits(), 2048)
    assert asked.request is not None and asked.request["tools"]["choice"] == "auto"
    envelope = ('{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo",'
                '"unit":"celsius"}},{"name":"get_weather","arguments":{"city":"Rome",'
                '"unit":"fahrenheit"}}]}')
    message = shapes.chat_message(envelope, asked.request)
    assert message["content"] == ""
    assert message["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}},
        {"function": {"name": "get_weather",
                      "arguments": {"city": "Rome", "unit": "fahrenheit"}}}]
    text = shapes.chat_message('{"response":"It is \\"mild\\"."}', asked.request)
    assert text == {"role": "assistant", "content": 'It is "mild".', "tool_calls": []}
    # Two calls of one tool: each result answers the earliest unanswered call.
    turn = shapes.chat_request({"model": MODEL, "tools": [WEATHER_TOOL], "messages": [
        *ASK, {"role": "assistant", "tool_calls": message["tool_calls"]},
        {"role": "tool", "tool_name": "get_weather", "content": "5 C"},
        {"role": "tool", "content": "30 C"}]}, Limits(), 2048)
    assert turn.request is not None
    sent = turn.request["messages"]
    ids = [c["id"] for c in sent[1]["tool_calls"]]
    assert [m.get("tool_call_id") for m in sent[2:]] == ids
    assert json.loads(sent[1]["tool_calls"][1]["function"]["arguments"])["city"] == "Rome"


def test_generate_streamed_and_not_raw_and_templated(client: ollama.Client) -> None:
    reply = client.generate(model=MODEL, prompt="The capital of France is", raw=True,
                            options={"temperature": 0, "num_predict": 4})
    assert reply.model == SHOWN and reply.done and "Paris" in reply.response
    assert reply.eval_count == 4 and reply.done_reason == "length"

    parts = list(client.generate(model=MODEL, prompt="What is the capital of France?",
                                 system="Answer in one word.", stream=True,
                                 options={"temperature": 0, "num_predict": 8, "seed": 7}))
    assert parts[-1].done and parts[-1].prompt_eval_count > 10  # system + template
    assert "".join(p.response for p in parts[:-1]).strip()


def test_names_resolve_and_unknown_ones_are_404(client: ollama.Client) -> None:
    for name in (MODEL, f"{MODEL}:latest", SHOWN, f"{MODEL}@{VERSION}"):
        reply = client.generate(model=name, prompt="Hi", options={"num_predict": 1})
        assert reply.model == SHOWN and reply.eval_count == 1, name
    for name in (f"{MODEL}:9.9.9", f"{MODEL}@9.9.9", "llama3.2", "llama3.2:latest"):
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=name, messages=ASK)
        assert (err.value.status_code, err.value.error) == (404, f"model '{name}' not found")
    with pytest.raises(ollama.ResponseError) as err:
        client.show("llama3.2")
    assert err.value.status_code == 404


def test_model_management_is_the_fleets(client: ollama.Client, ollama_url: str) -> None:
    calls = {
        "pull": lambda: client.pull(MODEL),
        "push": lambda: client.push(MODEL),
        "create": lambda: client.create(model="mine", from_=MODEL, system="be brief"),
        "copy": lambda: client.copy(MODEL, "mine"),
        "delete": lambda: client.delete(MODEL),
    }
    for op, call in calls.items():
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert (err.value.status_code, err.value.error) == (403, MANAGED), op
    assert httpx.head(f"{ollama_url}/api/blobs/sha256:{'0' * 64}").status_code == 403
    r = httpx.post(f"{ollama_url}/api/blobs/sha256:{'0' * 64}", content=b"x")
    assert (r.status_code, r.json()) == (403, {"error": MANAGED})
    assert [m.model for m in client.list().models] == [f"{MODEL}:latest", SHOWN]


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "request body is not valid JSON"),
    (b"[1]", "request body must be a JSON object"),
    ({"messages": ASK}, "'model' is required"),
    ({"model": MODEL, "messages": "hi"}, "'messages' must be a list"),
    ({"model": MODEL, "messages": [{"content": "x"}]}, "messages[0] needs a role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     "messages[0].images: text only"),
    ({"model": MODEL, "messages": ASK, "stream": "yes"}, "'stream' must be true or false"),
    ({"model": MODEL, "messages": ASK, "temperature": 0.2},
     "unknown 'temperature' for /api/chat"),
    ({"model": MODEL, "messages": ASK, "think": True}, "'think' is not supported"),
    ({"model": MODEL, "messages": ASK, "options": {"top_k": 5}},
     "'options.top_k' is not supported: sampling uses top_k 40"),
    ({"model": MODEL, "messages": ASK, "options": {"num_gqa": 8}},
     "unknown 'options.num_gqa' for /api/chat"),
    ({"model": MODEL, "messages": ASK, "options": {"num_ctx": 1 << 20}},
     "'options.num_ctx' (1048576) is above this device's context"),
    ({"model": MODEL, "messages": ASK, "options": {"num_predict": 0}},
     "'options.num_predict' must be -1 or -2"),
    ({"model": MODEL, "messages": ASK, "options": {"temperature": 3}},
     "'options.temperature' must be a number from 0 to 2"),
    ({"model": MODEL, "messages": ASK, "options": {"stop": ["a", "b", "c", "d", "e"]}},
     "'options.stop' must be a string or a list of at most 4"),
    ({"model": MODEL, "messages": ASK, "format": "yaml"},
     "'format' must be \"json\" or a JSON schema object"),
    ({"model": MODEL, "messages": ASK, "format": {"type": "string", "pattern": "^a"}},
     "format: JSON Schema keyword 'pattern' is not supported"),
    ({"model": MODEL, "messages": ASK, "keep_alive": True}, "'keep_alive' must be a duration"),
    ({"model": MODEL, "messages": ASK, "tools": [{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "pattern": "^[A-Z]"}}}}}]},
     "JSON Schema keyword 'pattern' is not supported"),
    ({"model": MODEL, "messages": ASK, "tools": {"weather": {}}},
     "'tools' must be a list of"),
    ({"model": MODEL, "messages": [*ASK, {"role": "tool", "content": "12 C"}]},
     "a tool result needs an earlier assistant tool call to answer"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "weather", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0] must be"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]},
     "prompt is 5000 characters, limit 4000"),
])
def test_bad_chat_bodies_are_400_and_the_api_keeps_serving(ollama_url: str, body, message) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{ollama_url}/api/chat", timeout=30, **kwargs)
    assert r.status_code in (400, 413), r.text
    error = r.json()["error"]
    assert isinstance(error, str) and message in error, error
    assert httpx.get(f"{ollama_url}/api/tags", timeout=30).status_code == 200


@pytest.mark.parametrize(("body", "message"), [
    ({"model": MODEL, "prompt": 5}, "'prompt' must be a string"),
    ({"model": MODEL, "prompt": "x", "images": ["aGk="]}, "'images' is not supported"),
    ({"model": MODEL, "prompt": "x", "suffix": "}"}, "'suffix' is not supported"),
    ({"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"},
     "'template' is not supported"),
    ({"model": MODEL, "prompt": "x", "context": [1, 2]}, "'context' is not supported"),
    ({"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, "'system' has no place"),
    ({"model": MODEL, "prompt": "x", "messages": ASK}, "unknown 'messages' for /api/generate"),
])
def test_bad_generate_bodies_are_400(ollama_url: str, body, message) -> None:
    r = httpx.post(f"{ollama_url}/api/generate", json=body, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_load_requests_and_a_keep_alive_keep_the_model_loaded(
        client: ollama.Client, ollama_url: str) -> None:
    # keep_alive 0 (unload) is tested in test_inference_models.py.
    for route, body in (("chat", {"messages": []}), ("generate", {})):
        r = httpx.post(f"{ollama_url}/api/{route}",
                       json={"model": MODEL, "keep_alive": "5m", **body}, timeout=30)
        assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
    reply = client.generate(model=MODEL, prompt="Hi", keep_alive="10m",
                            options={"num_predict": 1, "num_ctx": 512, "num_thread": 64,
                                     "top_k": 40, "repeat_last_n": 8})
    assert reply.eval_count == 1
    assert [m.model for m in client.ps().models] == [SHOWN]  # still loaded


def test_both_listeners_speak_ollama_and_the_main_one_openai_too(
        url: str, ollama_url: str) -> None:
    assert url != ollama_url
    for base in (url, ollama_url):
        r = httpx.get(f"{base}/")
        assert (r.status_code, r.text) == (200, "Ollama is running")
        assert httpx.head(f"{base}/").status_code == 200
        assert httpx.get(f"{base}/api/version").json() == {"version": OLLAMA_VERSION}
        assert ollama.Client(host=base).ps().models[0].model == SHOWN
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == MODEL
    r = httpx.get(f"{ollama_url}/api/chat")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_worker_lost_mid_stream_ends_the_stream_with_an_error_line(
        rig: DeviceRig, url: str, ollama_url: str, client: ollama.Client) -> None:
    assert rig.agent is not None
    (old,) = worker_pids(rig.agent.pid)
    lines = []
    with httpx.stream("POST", f"{ollama_url}/api/chat", timeout=120, json={
            "model": MODEL, "options": {"num_predict": 400, "temperature": 0},
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    }) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
            if len(lines) == 2:
                os.kill(old, signal.SIGKILL)  # headers and text are out: the error goes in-band
    *pieces, last = lines
    assert len(pieces) >= 2 and not any(p["done"] for p in pieces)
    assert list(last) == ["error"] and "killed by SIGKILL" in last["error"], last
    wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "a new worker")
    assert old not in worker_pids(rig.agent.pid)
    assert client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1}).eval_count == 1


def test_embedding_routes_without_an_embedder_say_so(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input="hello")
    assert err.value.status_code == 400 and "does not serve embeddings" in err.value.error


def test_embed_where_the_model_embeds(model_path: Path) -> None:
    runtime_settings = EffectiveRuntime(threads=2, gpu_layers=0, batch=None, context=512,
                                        mmap=True, embeddings=True)
    spec = ModelSpec(f"{MODEL}@{VERSION}-micro", MODEL, VERSION, "gguf", model_path,
                     runtime_settings)

    async def scenario() -> None:
        async with in_process_api(spec) as (_, url):
            await check(ollama.AsyncClient(host=url, timeout=120))

    async def check(client: ollama.AsyncClient) -> None:
        reply = await client.embed(model=SHOWN, input=["The cat sat.", "Stock prices fell."])
        assert reply.model == SHOWN and len(reply.embeddings) == 2
        assert [len(v) for v in reply.embeddings] == [576, 576]  # the model's width
        assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6) for v in reply.embeddings)
        assert reply.embeddings[0] != reply.embeddings[1] and reply.prompt_eval_count > 0
        same = await client.embed(model=MODEL, input="The cat sat.")
        # Alone or in a batch, a text embeds the same (up to float noise).
        assert same.embeddings[0] == pytest.approx(reply.embeddings[0], abs=1e-3)
        legacy = await client.embeddings(model=MODEL, prompt="The cat sat.")
        norm = math.hypot(*legacy.embedding)
        assert [v / norm for v in legacy.embedding] == pytest.approx(same.embeddings[0],
                                                                     abs=1e-5)
        assert (await client.embed(model=MODEL, input=[])).embeddings == []
        assert (await client.show(MODEL)).capabilities == ["embedding"]
        with pytest.raises(ollama.ResponseError) as err:
            await client.embed(model=MODEL, input="x", dimensions=8)
        assert err.value.status_code == 400 and "'dimensions'" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat(model=MODEL, messages=ASK)
        assert (err.value.status_code, err.value.error) == (
            400, "this model serves embeddings only")

    asyncio.run(scenario())


def test_a_taken_ollama_port_stops_the_agent_before_it_starts(
        tmp_path: Path, broker, new_device) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        device_id = f"oll-held-{secrets.token_hex(3)}"
        config = write_agent_config(tmp_path, device_id, broker.url, new_device(device_id),
                                    ollama_port=port)
        agent = AgentProcess(config)
        try:
            assert agent.proc.wait(timeout=60) == 1, agent.log()
            log = agent.log()
            assert f"local API cannot listen on 127.0.0.1:{port}" in log
            assert "set ollama_port" in log and "another process holds that port" in log
        finally:
            agent.terminate()


# -- pure ---------------------------------------------------------------------------------


def test_name_forms() -> None:
    assert resolve_name("m", "m", "1.0") == "m"
    assert resolve_name("m:latest", "m", "1.0") == "m"
    assert resolve_name("m:1.0", "m", "1.0") == "m@1.0"
    assert resolve_name("m@1.0", "m", "1.0") == "m@1.0"
    for other in ("m:2.0", "m@2.0", "m@latest", "n", "n:1.0", "m:", "mm"):
        assert resolve_name(other, "m", "1.0") is None, other


def _docs_table(marker: str) -> dict[str, list[str]]:
    """name -> its other cells, from the table between the marker comments."""
    text = DOCS.read_text()
    start, end = text.index(f"<!-- {marker}:start -->"), text.index(f"<!-- {marker}:end -->")
    rows = {}
    for line in text[start:end].splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _routes(routes: frozenset[str]) -> str:
    order = [ollama_fields.CHAT, ollama_fields.GENERATE, ollama_fields.EMBED,
             ollama_fields.EMBEDDINGS]
    return ", ".join(r for r in order if r in routes)


def test_docs_tables_match_the_code() -> None:
    fields, options = _docs_table("ollama-fields"), _docs_table("ollama-options")
    assert list(fields) == list(FIELDS) and list(options) == list(OPTIONS)
    for name, field in FIELDS.items():
        routes, handling, note = fields[name]
        assert (routes, handling) == (_routes(field.routes), field.handling), name
        assert note.startswith(field.note), name
    for name, field in OPTIONS.items():
        handling, note = options[name]
        assert handling == field.handling and note.startswith(field.note), name


def test_ttft_and_durations_are_nanoseconds(client: ollama.Client) -> None:
    started = time.monotonic()
    reply = client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    wall_ns = (time.monotonic() - started) * 1e9
    assert 0 < reply.total_duration <= wall_ns
    assert reply.prompt_eval_duration + reply.eval_duration <= reply.total_duration * 1.01


def test_translation_into_the_worker_request() -> None:
    from agent.inference.ollama_shapes import chat_request, generate_request
    from agent.inference.schemas import Limits

    limits, user = Limits(), [{"role": "user", "content": "x"}]
    plain = chat_request({"model": MODEL, "messages": user}, limits, 2048)
    assert plain.stream is True  # Ollama streams unless told not to
    assert plain.request is not None
    assert (plain.request["temperature"], plain.request["top_p"]) == (0.8, 0.9)
    assert plain.request["max_tokens"] == limits.default_max_tokens
    whole = chat_request({"model": MODEL, "messages": user, "stream": False,
                          "options": {"num_predict": -2, "temperature": 0, "stop": ["\n"]}},
                         limits, 2048)
    assert whole.stream is False and whole.request is not None
    assert whole.request["max_tokens"] is None  # the worker fills the context
    assert (whole.request["temperature"], whole.request["stop"]) == (0.0, ["\n"])
    json_mode = chat_request({"model": MODEL, "messages": user, "format": "json"}, limits, 2048)
    assert json_mode.request is not None
    assert json_mode.request["response_format"] == {"type": "json_object"}
    schema = chat_request({"model": MODEL, "messages": user, "format": PERSON}, limits, 2048)
    assert schema.request is not None
    assert schema.request["response_format"] == {"type": "json_schema", "schema": PERSON}

    raw = generate_request({"model": MODEL, "prompt": "p", "raw": True}, limits, 2048).request
    assert raw is not None and raw["prompt"] == "p" and "messages" not in raw
    turn = generate_request({"model": MODEL, "prompt": "p", "system": "s"}, limits, 2048).request
    assert turn is not None and turn["messages"] == [{"role": "system", "content": "s"},
                                                     {"role": "user", "content": "p"}]
    assert generate_request({"model": MODEL}, limits, 2048).request is None  # load only


def test_ollama_port_must_differ_from_api_port() -> None:
    from pydantic import ValidationError

    from agent.config import AgentConfig

    base = {"device_id": "dev-1", "broker_url": "mqtt://127.0.0.1:1883", "password": "x"}
    assert AgentConfig(**base).ollama_port is None  # off unless asked for
    assert AgentConfig(**base, ollama_port=11434).ollama_port == 11434
    assert AgentConfig(**base, api_port=0, ollama_port=0).ollama_port == 0  # two free ports
    with pytest.raises(ValidationError, match="ollama_port must differ from api_port"):
        AgentConfig(**base, ollama_port=11435)
