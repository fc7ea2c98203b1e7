"""Tool calls on the local OpenAI API: the envelope, its reader, and the real model calling.

The envelope reader is fed every answer split at every point and must
read the same content and calls as from the whole text; the grammar
llama.cpp builds from the tools must parse. Then the real SmolLM2 GGUF
(whose ChatML template cannot show tools) behind a real agent answers the
official ``openai`` client: every call's arguments must validate against
its tool's ``parameters`` with ``jsonschema``, streamed and not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import llama_cpp
import openai
import pytest

from agent.inference import tool_calls as tc
from agent.inference.prompting import PromptBuilder, grammar_parses
from tests.support.inference import served_model

MODEL = "smollm2-135m"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 24},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
BOOKING = {
    "type": "object",
    "properties": {"people": {"type": "integer", "minimum": 1, "maximum": 12},
                   "times": {"type": "array", "minItems": 1, "maxItems": 3,
                             "items": {"type": "string", "maxLength": 8}},
                   "note": {"type": "string", "maxLength": 20}},
    "required": ["people", "times"], "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                      "description": "The current weather in a city."}},
    {"type": "function", "function": {"name": "book_table", "parameters": BOOKING,
                                      "description": "Book a table at a restaurant."}},
]
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING}
ASK = [{"role": "user", "content": "What is the weather in Paris? Then book a table for 4."}]
#: 50 seeds, in blocks that each end well within the suite's per-test timeout
SEED_BLOCKS = [range(i, i + 10) for i in range(0, 50, 10)]
#: ample for one call with the longest arguments the schemas allow, indented
MAX_TOKENS = 200
#: ample for the most calls one answer may hold (tool_calls.MAX_CALLS)
MANY_TOKENS = 1024


def plan(choice: Any = "auto", parallel: bool | None = None) -> tc.ToolPlan:
    found = tc.parse_openai(TOOLS, choice, parallel)
    assert found is not None
    return found


# -- the envelope reader ----------------------------------------------------------------------

ENVELOPES = [
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Pa\\"ris}","unit":"celsius"}'
    ' }]}',
    '{"tool_calls":[{"name":"get_weather","arguments":{ "city": "Oslo",\n  "unit": '
    '"fahrenheit"}},{"name":"book_table","arguments":{"people":4,"times":["19:00","[{"]}'
    "\n  }]}",
    '{"response":"Sunny, 21 \\u00b0C\\n\\"nice\\" \\ud83d\\ude00 \\\\ \\u00e9\\ud800x"}',
    '{"response":""}',
    "not an envelope at all",
    '{"tool_calls":[{"name":"book_table","arguments":{"people":3,"ti',
]


def _replay(events: list[tc.Event]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) as a client accumulates them from events."""
    text, calls = "", []
    for event in events:
        if isinstance(event, tc.TextPiece):
            text += event.text
        elif isinstance(event, tc.CallStarted):
            assert event.index == len(calls)
            calls.append((event.name, ""))
        else:
            name, args = calls[event.index]
            calls[event.index] = (name, args + event.text)
    return text, calls


@pytest.mark.parametrize("text", ENVELOPES, ids=range(len(ENVELOPES)))
def test_reader_reads_the_same_at_every_split_point(text: str) -> None:
    whole = tc.read_reply(plan(), text)
    for cut in range(len(text) + 1):
        reader = tc.EnvelopeReader(plan())
        events = reader.feed(text[:cut]) + reader.feed(text[cut:])
        assert reader.finish() == whole, cut
        content, calls = _replay(events)
        assert content == (whole.content or "") and calls == [
            (c.name, c.arguments) for c in whole.calls], cut
    reader = tc.EnvelopeReader(plan())
    events = [e for ch in text for e in reader.feed(ch)]
    assert _replay(events) == _replay(tc.EnvelopeReader(plan()).feed(text))


def test_reader_gives_calls_arguments_and_decoded_text() -> None:
    first = tc.read_reply(plan(), ENVELOPES[1])
    assert first.complete and first.content is None
    assert [c.name for c in first.calls] == ["get_weather", "book_table"]
    assert json.loads(first.calls[0].arguments) == {"city": "Oslo", "unit": "fahrenheit"}
    assert json.loads(first.calls[1].arguments) == {"people": 4, "times": ["19:00", "[{"]}
    assert json.loads(tc.read_reply(plan(), ENVELOPES[0]).calls[0].arguments)["city"] \
        == 'Pa"ris}'
    text = tc.read_reply(plan(), ENVELOPES[2])
    assert text.content == json.loads(ENVELOPES[2])["response"] and not text.calls
    assert tc.read_reply(plan(), ENVELOPES[3]).content == ""


def test_reader_passes_other_text_through_and_marks_a_cut_envelope() -> None:
    assert tc.read_reply(plan(), ENVELOPES[4]).content == ENVELOPES[4]
    assert tc.read_reply(None, ENVELOPES[0]).content == ENVELOPES[0]
    assert tc.read_reply(plan("none"), ENVELOPES[0]).content == ENVELOPES[0]
    cut = tc.read_reply(plan(), ENVELOPES[5])
    assert not cut.complete and cut.calls[0].arguments == '{"people":3,"ti'
    assert tc.read_reply(plan(), '{"tool').content == '{"tool'


# -- checking the tools ------------------------------------------------------------------------

def _fn(name: str = "f", **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **extra}}


@pytest.mark.parametrize(("tools", "choice", "parallel", "param", "words"), [
    ([{"type": "custom", "custom": {"name": "f"}}], None, None, "tools", "'custom'"),
    ("f", None, None, "tools", "a list"),
    ([_fn()] * 65, None, None, "tools", "at most 64"),
    ([_fn("no spaces")], None, None, "tools", "function.name"),
    ([_fn(), _fn()], None, None, "tools", "twice"),
    ([_fn(parameters={"type": "array"})], None, None, "tools", "\"type\": \"object\""),
    ([_fn(parameters={"type": "object", "properties": {"id": {"type": "string",
                                                             "pattern": "x"}}})],
     None, None, "tools", "'pattern' is not supported (at #/properties/id)"),
    ([_fn(extra=1)], None, None, "tools", "function.extra"),
    ([_fn()], "sometimes", None, "tool_choice", "must be"),
    ([_fn()], {"type": "function", "function": {"name": "g"}}, None, "tool_choice", "'g'"),
    (None, "required", None, "tool_choice", "needs 'tools'"),
    ([_fn()], None, "yes", "parallel_tool_calls", "true or false"),
])
def test_bad_tools_are_refused_naming_the_field(tools: Any, choice: Any, parallel: Any,
                                                param: str, words: str) -> None:
    with pytest.raises(tc.ToolError) as caught:
        tc.parse_openai(tools, choice, parallel)
    assert caught.value.param == param and words in str(caught.value)


def test_no_tools_is_no_plan_and_no_parameters_is_an_empty_object() -> None:
    assert tc.parse_openai(None, None, None) is None
    assert tc.parse_openai([], "none", True) is None
    made = tc.parse_openai([_fn()], None, None)
    assert made is not None and made.choice == "auto" and made.parallel
    assert made.tools[0].parameters == tc.NO_PARAMETERS
    assert tc.ToolPlan.from_wire(made.wire()) == made


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[llama_cpp.Llama]:
    """The model's vocabulary and template alone: enough to parse grammars and render."""
    llm = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize(("choice", "parallel"), [
    ("auto", None), ("required", None), ("required", False),
    ({"type": "function", "function": {"name": "book_table"}}, None),
])
def test_envelope_grammar_parses_in_llama_cpp(vocab: llama_cpp.Llama, choice: Any,
                                              parallel: bool | None) -> None:
    grammar = tc.envelope_gbnf(plan(choice, parallel))
    assert grammar_parses(vocab, grammar)
    assert ("response ::=" in grammar) == (choice == "auto")
    assert ("{0,7}" in grammar) == (parallel is None)
    assert ('"book_table' in grammar) and (('"get_weather' in grammar) == isinstance(choice, str))


def test_tools_with_same_named_definitions_keep_their_own_rules(vocab: llama_cpp.Llama
                                                                 ) -> None:
    def tool(name: str, item: dict[str, Any]) -> dict[str, Any]:
        return _fn(name, parameters={"type": "object", "$defs": {"Item": item},
                                     "properties": {"x": {"$ref": "#/$defs/Item"}},
                                     "required": ["x"]})

    both = tc.parse_openai([tool("a", {"type": "integer", "minimum": 7, "maximum": 9}),
                            tool("b", {"type": "boolean"})], "required", None)
    assert both is not None
    grammar = tc.envelope_gbnf(both)
    assert grammar_parses(vocab, grammar)
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert "[7-9]" in rules["tool0-ref--defs-Item-body"]
    assert rules["tool1-ref--defs-Item"] == "boolean"


FOLLOW_UP: list[dict[str, Any]] = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "book_table", "arguments": '{"people":4,"times":["19:00"]}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    {"role": "tool", "tool_call_id": "call_2", "content": "Booked for 19:00."},
]


def test_a_template_without_tools_gets_calls_and_results_as_text(vocab: llama_cpp.Llama
                                                                 ) -> None:
    builder = PromptBuilder(vocab)
    assert not builder.template_has_tools  # SmolLM2's ChatML template
    with pytest.raises(TypeError):  # what rendering the raw messages would do
        builder.formatter(messages=FOLLOW_UP)
    wire = plan().wire()
    rendered = vocab.detokenize(builder.prompt({"messages": FOLLOW_UP, "tools": wire}).tokens,
                                special=True).decode()
    assert '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"' in rendered
    assert rendered.count("<|im_start|>user") == 2  # both results in one turn
    assert '"tool_call_id": "call_2"' in rendered and "Booked for 19:00." in rendered
    assert '"name": "book_table", "description": "Book a table' in rendered
    silent = vocab.detokenize(builder.prompt(
        {"messages": FOLLOW_UP, "tools": plan("none").wire()}).tokens, special=True).decode()
    assert "book_table\", \"description" not in silent and "Booked for 19:00." in silent
    assert builder.grammar_text({"messages": FOLLOW_UP, "tools": plan("none").wire()}) is None


#: a chat template that shows tools itself, as Qwen's or Llama 3.1's do (in brief)
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0].content }}\n# Tools\n"
    "{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if not (tools and loop.first) %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tools_gets_them_and_the_envelope_still_holds(
        vocab: llama_cpp.Llama) -> None:
    builder = PromptBuilder(vocab)
    builder.template = TOOL_TEMPLATE
    builder.formatter = builder._chat_formatter()
    builder.template_has_tools = True
    request = {"messages": [{"role": "system", "content": "Be brief."}, *FOLLOW_UP],
               "tools": plan("required").wire()}
    rendered = vocab.detokenize(builder.prompt(request).tokens, special=True).decode()
    assert "Be brief.\n\n" + tc.instructions(plan("required"), list_tools=False) in rendered
    assert '# Tools\n{"name": "get_weather"' in rendered
    assert '<tool_call>book_table {"people":4,"times":["19:00"]}</tool_call>' in rendered
    assert "<|im_start|>tool\nBooked for 19:00." in rendered
    assert builder.grammar_text(request) == tc.envelope_gbnf(plan("required"))


# -- the real model behind the real agent --------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory, broker, cp_credentials, model_path: Path
           ) -> Iterator[openai.OpenAI]:
    """The official client of a fresh agent serving SmolLM2."""
    with served_model(tmp_path_factory.mktemp("tools"), broker, cp_credentials, "tools",
                      model_path, MODEL) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                            timeout=300)


@pytest.fixture(scope="module")
def url(client: openai.OpenAI) -> str:
    """The agent's API base URL, for requests the client would not send."""
    return str(client.base_url).rstrip("/").removesuffix("/v1")


def _valid_calls(calls: list[Any]) -> list[str]:
    """The names of ``calls`` (OpenAI objects), each checked against its tool's schema."""
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)
    return [c.function.name for c in calls]


def _ask(client: openai.OpenAI, seed: int, stream: bool, **extra: Any) -> tuple[Any, str]:
    """(message, finish_reason) of one answer; streamed ones through the client's helper."""
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": TOOLS, "seed": seed,
                            "temperature": 0.8, "max_tokens": MAX_TOKENS, **extra}
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        return choice.message, choice.finish_reason
    try:
        with client.chat.completions.stream(**body) as events:
            choice = events.get_final_completion().choices[0]
    except openai.LengthFinishReasonError as exc:
        # the helper refuses to parse a cut answer when tools are given: still an answer
        choice = exc.completion.choices[0]
    return choice.message, choice.finish_reason


@pytest.mark.integration
@pytest.mark.parametrize("seeds", SEED_BLOCKS, ids=[f"seeds{b[0]}" for b in SEED_BLOCKS])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_required_single_calls_validate_for_every_seed(client: openai.OpenAI, stream: bool,
                                                       seeds: range) -> None:
    """parallel_tool_calls false: exactly one call, every time."""
    for seed in seeds:
        message, finish = _ask(client, seed, stream, tool_choice="required",
                               parallel_tool_calls=False)
        assert finish == "tool_calls", (seed, message)
        assert message.content is None, seed
        assert len(_valid_calls(message.tool_calls)) == 1, seed


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_parallel_calls_all_validate(client: openai.OpenAI, stream: bool) -> None:
    for seed in range(2):
        message, finish = _ask(client, seed, stream, tool_choice="required",
                               max_tokens=MANY_TOKENS)
        assert finish == "tool_calls", (seed, message)
        assert 1 <= len(_valid_calls(message.tool_calls)) <= tc.MAX_CALLS


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_named_function_is_the_one_called(client: openai.OpenAI, stream: bool) -> None:
    for seed in range(4):
        message, finish = _ask(client, seed, stream, parallel_tool_calls=seed % 2 == 0,
                               max_tokens=MANY_TOKENS, tool_choice={
                                   "type": "function", "function": {"name": "book_table"}})
        assert finish == "tool_calls"
        assert set(_valid_calls(message.tool_calls)) == {"book_table"}, seed


@pytest.mark.integration
def test_auto_answers_text_or_valid_calls(client: openai.OpenAI) -> None:
    kinds = set()
    for seed in range(6):
        message, finish = _ask(client, seed, seed % 2 == 1, tool_choice="auto",
                               max_tokens=MANY_TOKENS)
        if message.tool_calls:
            assert finish == "tool_calls" and message.content is None
            _valid_calls(message.tool_calls)
            kinds.add("calls")
        else:
            assert finish in ("stop", "length") and isinstance(message.content, str)
            assert not message.content.startswith('{"response"'), message.content
            kinds.add("text")
    assert kinds  # which of the two a 135M model picks is its own business


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_follow_up_with_results_and_tool_choice_none_answers_text(client: openai.OpenAI,
                                                                  stream: bool) -> None:
    for seed in range(3):
        message, finish = _ask(client, seed, stream, tool_choice="none", max_tokens=48,
                               messages=FOLLOW_UP)
        assert not message.tool_calls and finish in ("stop", "length")
        assert isinstance(message.content, str) and message.content.strip()


@pytest.mark.integration
def test_streamed_calls_arrive_as_openai_deltas(url: str) -> None:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
            "seed": 3, "temperature": 0.8, "max_tokens": MANY_TOKENS, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert chunks[0]["delta"] == {"role": "assistant", "content": None}
    deltas = [d for c in chunks for d in c["delta"].get("tool_calls", [])]
    opening = [d for d in deltas if "id" in d]
    assert opening and all(d["type"] == "function" and d["function"]["arguments"] == ""
                           and d["function"]["name"] in SCHEMAS for d in opening)
    assert [d["index"] for d in opening] == list(range(len(opening)))
    for i, first in enumerate(opening):
        arguments = "".join(d["function"]["arguments"] for d in deltas if d["index"] == i)
        jsonschema.validate(json.loads(arguments), SCHEMAS[first["function"]["name"]])
    assert [c["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert all(c["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.integration
@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"tools": [_fn(parameters={"type": "object", "properties": {
        "d": {"type": "string", "format": "date"}}})]}, "tools", "unsupported_schema_keyword"),
    ({"tools": [{"type": "custom"}]}, "tools", "unsupported_parameter"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "invalid_request"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_request"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
     "unsupported_parameter"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages", "invalid_request"),
    ({"messages": [*ASK, {"role": "assistant", "content": None,
                          "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
     "messages", "invalid_request"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(url: str, client: openai.OpenAI,
                                                      extra: dict[str, Any], param: str,
                                                      code: str) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 8, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.param == param
    # the agent still answers afterwards
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices
