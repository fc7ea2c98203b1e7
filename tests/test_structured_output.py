"""``response_format``: JSON Schema -> GBNF, and grammar-constrained answers of the real model.

The converter is checked on its own (digit ranges against every integer in
a span, grammars that llama.cpp parses, each unsupported keyword refused
with its path); then the real SmolLM2 GGUF behind a real agent's local API
answers the official ``openai`` client under a schema, streamed and not,
and every answer must parse and validate with ``jsonschema``. The full
50-seed run is bench/structured_output.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import llama_cpp
import openai
import pytest

from agent.inference.integer_ranges import digit_alternatives, integer_range
from agent.inference.json_schema_grammar import (
    ANNOTATIONS,
    ENFORCED,
    UnsupportedSchema,
    json_object_gbnf,
    schema_to_gbnf,
)
from agent.inference.prompting import grammar_parses
from tests.support.inference import in_process_api, served_model, write_onnx_embedder
from tests.support.structured import BASKET_SCHEMA, PROMPT, ask, response_format

MODEL = "smollm2-135m"
#: seeds per mode here; bench/structured_output.py runs 50
SEEDS = range(8)


# -- the converter -----------------------------------------------------------------------

def _as_regex(gbnf_digits: str) -> re.Pattern[str]:
    """integer_range's GBNF uses only literals, classes, groups and {n}: regex-compatible
    once the quotes and spaces go."""
    return re.compile(gbnf_digits.replace('"', "").replace(" ", ""))


@pytest.mark.parametrize(("lo", "hi"), [
    (0, 0), (0, 9), (3, 117), (10, 99), (7, 1000), (105, 1999), (1, 100000), (42, 42),
    (-15, 1234), (-1000, -7), (-9, 0), (None, 37), (-120, None), (250, None), (None, -3),
])
def test_integer_ranges_match_exactly_the_integers_in_range(lo: int | None,
                                                            hi: int | None) -> None:
    pattern = _as_regex(integer_range(lo, hi))
    low = -3000 if lo is None else lo
    for n in range(low - 200, (3000 if hi is None else hi) + 200):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == inside, (lo, hi, n, pattern.pattern)
    assert not pattern.fullmatch("007") and not pattern.fullmatch("-0" + str(abs(low) or 1))


def test_digit_alternatives_have_one_length_each_and_no_leading_zero() -> None:
    alternatives = digit_alternatives(0, 54321)
    assert sorted(len(a) for a in alternatives) == [len(a) for a in alternatives]
    for alt in alternatives:
        assert len(alt) == 1 or not alt[0].startswith("0"), alt
    with pytest.raises(ValueError):
        digit_alternatives(5, 4)


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[llama_cpp.Llama]:
    """The model's vocabulary alone: enough for llama.cpp to parse a grammar."""
    llm = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


GOOD_SCHEMAS: list[Any] = [
    BASKET_SCHEMA,
    {},
    True,
    {"type": "object"},
    {"type": ["string", "null"], "maxLength": 5, "title": "t", "description": "d"},
    {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
    {"type": "array", "maxItems": 0},
    {"type": "object", "additionalProperties": {"type": "integer", "minimum": -5}},
    {"type": "object", "properties": {"a": {"const": {"x": [1, "é\"\\"]}},
                                      "b": {"type": "boolean"}, "c": {"type": "null"}}},
    {"anyOf": [{"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
               {"type": "string", "enum": ["none", "many"]}]},
    {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"},
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
        "required": ["value", "next"]}},
     "$ref": "#/$defs/node"},
    {"definitions": {"s": {"type": "string", "minLength": 1}},
     "type": "object", "properties": {"x": {"$ref": "#/definitions/s"},
                                      "y": {"$ref": "#/definitions/s"}, "z": {"$ref": "#"}}},
    {"type": "object", "properties": {"k1": {"type": "string"}, "k2": {"type": "integer"},
                                      "k3": {"type": "number"}}, "required": ["k2"]},
]


@pytest.mark.parametrize("schema", GOOD_SCHEMAS, ids=range(len(GOOD_SCHEMAS)))
def test_schema_grammar_parses_in_llama_cpp(schema: Any, vocab: llama_cpp.Llama) -> None:
    text = schema_to_gbnf(schema)
    assert text.startswith("root ::= ")
    assert grammar_parses(vocab, text), text
    llama_cpp.LlamaGrammar.from_string(text, verbose=False)


def test_json_object_grammar_parses_and_a_broken_one_does_not(vocab: llama_cpp.Llama) -> None:
    assert grammar_parses(vocab, json_object_gbnf())
    assert not grammar_parses(vocab, "root ::= undefined-rule")


def test_properties_keep_their_declared_order_required_first() -> None:
    text = schema_to_gbnf({"type": "object", "properties": {
        "b": {"type": "integer"}, "a": {"type": "string"}, "c": {"type": "boolean"}},
        "required": ["c", "a"]})
    root = text.splitlines()[0]
    assert root.index("root-a-kv") < root.index("root-c-kv") < root.index("root-b-kv"), root
    # whitespace is bounded, never an open-ended run of blanks
    assert 'space ::= | " " | "\\n" [ \\t]{0,20}' in text


REFUSED: list[tuple[Any, str, str]] = [
    ({"type": "string", "pattern": "^a+$"}, "pattern", "#"),
    ({"type": "object", "properties": {"when": {"type": "string", "format": "date"}}},
     "format", "#/properties/when"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", "#"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}},
     "multipleOf", "#/properties/n"),
    ({"allOf": [{"type": "string"}]}, "allOf", "#"),
    ({"not": {"type": "null"}}, "not", "#"),
    ({"type": "object", "minProperties": 1}, "minProperties", "#"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "#"),
    ({"type": "array", "prefixItems": [{"type": "string"}]}, "prefixItems", "#"),
    ({"$defs": {"d": {"type": "string", "contentEncoding": "base64"}}, "$ref": "#/$defs/d"},
     "contentEncoding", "#/$defs/d"),
    ({"type": "array", "items": {"anyOf": [{"type": "string", "pattern": "x"}]}},
     "pattern", "#/items/anyOf/0"),
    ({"type": "object", "properties": {"a/b": {"if": {}}}}, "if", "#/properties/a~1b"),
]


@pytest.mark.parametrize(("schema", "keyword", "path"), REFUSED,
                         ids=[f"{k}@{p}" for _, k, p in REFUSED])
def test_unsupported_keyword_is_refused_with_its_path(schema: Any, keyword: str,
                                                      path: str) -> None:
    with pytest.raises(UnsupportedSchema) as caught:
        schema_to_gbnf(schema)
    assert caught.value.keyword == keyword and caught.value.path == path
    assert caught.value.code == "unsupported_schema_keyword"
    assert f"'{keyword}'" in str(caught.value) and f"(at {path})" in str(caught.value)
    assert keyword not in ENFORCED | ANNOTATIONS


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "number", "minimum": 0}, "'minimum' is enforced for type 'integer' only"),
    ({"type": ["integer", "number"], "maximum": 9}, "'maximum' is enforced for type 'integer'"),
    ({"type": ["string", "null"], "minItems": 1}, "'minItems' does not apply to type 'string'"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer lies in [5, 4]"),
    ({"type": "object", "required": ["x"]}, "required property 'x' is not declared"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"type": "string", "enum": ["a"], "maxLength": 3}, "'maxLength' beside 'enum'"),
    ({"type": "date"}, "'type' must be one of"),
    ({"type": "string", "maxLength": 10**6}, "'maxLength' must be an integer from 0"),
])
def test_keywords_used_beyond_what_the_grammar_enforces_are_refused(schema: Any,
                                                                    words: str) -> None:
    with pytest.raises(UnsupportedSchema, match=re.escape(words)):
        schema_to_gbnf(schema)


# -- the real model through the real local API -------------------------------------------

@pytest.fixture(scope="module")
def url(tmp_path_factory, broker, cp_credentials, model_path: Path) -> Iterator[str]:
    with served_model(tmp_path_factory.mktemp("structured"), broker, cp_credentials, "json",
                      model_path, MODEL) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_json_schema_answers_validate_for_every_seed(client: openai.OpenAI,
                                                     stream: bool) -> None:
    verdicts = [ask(client, MODEL, seed, stream) for seed in SEEDS]
    failed = [v for v in verdicts if v.problem]
    assert not failed, "\n".join(f"seed {v.seed}: {v.problem}: {v.text!r}" for v in failed)


@pytest.mark.integration
def test_json_object_always_parses(client: openai.OpenAI) -> None:
    for seed in range(4):
        reply = client.chat.completions.create(
            model=MODEL, seed=seed, temperature=0.7, max_tokens=400,
            response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}])
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice
        else:  # cut by max_tokens: said so, and the text is a prefix of an object
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.integration
def test_text_completions_honour_json_schema_too(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0,
                                                          "maximum": 9}},
              "required": ["answer"], "additionalProperties": False}
    reply = client.completions.create(model=MODEL, prompt="Two plus two, as JSON:",
                                      max_tokens=40, temperature=0.5, seed=3,
                                      extra_body={"response_format": response_format(schema)})
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].text), schema)


@pytest.mark.integration
def test_answer_cut_by_max_tokens_says_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, seed=1, temperature=0.5, max_tokens=6, response_format=response_format(),
        messages=[{"role": "user", "content": PROMPT}])
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 6
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


@pytest.mark.integration
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_unsupported_schema_keyword_is_a_400_naming_it(url: str, route: str) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}}
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8,
                            "response_format": response_format(schema)}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    r = httpx.post(f"{url}/v1/{'chat/' if route == 'chat' else ''}completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_schema_keyword" and error["param"] == "response_format"
    assert "'pattern'" in error["message"] and "#/properties/id" in error["message"]


@pytest.mark.integration
def test_openai_client_sees_the_refusal_as_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            response_format=response_format({"type": "array", "uniqueItems": True}))
    assert caught.value.code == "unsupported_schema_keyword"
    assert "uniqueItems" in caught.value.message


# -- ONNX refuses rather than dropping ---------------------------------------------------

def test_onnx_model_refuses_json_response_format(tmp_path: Path) -> None:
    from agent.inference.spec import ModelSpec
    from agent.runtime_settings import EffectiveRuntime

    path = tmp_path / "graph.onnx"
    write_onnx_embedder(path)
    runtime_settings = EffectiveRuntime(threads=1, gpu_layers=0, batch=None, context=512,
                                        mmap=True, embeddings=False,
                                        onnx_providers=("CPUExecutionProvider",))
    spec = ModelSpec("g@1.0.0", "g", "1.0.0", "onnx", path, runtime_settings)

    async def scenario() -> None:
        async with in_process_api(spec) as (_, url), \
                httpx.AsyncClient(base_url=url, timeout=60) as c:
            for fmt in ({"type": "json_object"}, response_format()):
                r = await c.post("/v1/chat/completions", json={
                    "model": "g", "messages": [{"role": "user", "content": "hi"}],
                    "response_format": fmt})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "unsupported_parameter"
                assert "response_format" in error["message"] and "ONNX" in error["message"]

    asyncio.run(scenario())
