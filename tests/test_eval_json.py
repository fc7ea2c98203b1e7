"""Evaluation items that judge JSON: the value the scorer extracts from an answer, and
items that carry a ``response_format``, validated on publishing and sent as the agent
sends any structured-output request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import protocol as p
from agent.healthcheck.evaluation import item_request, public_scores, worker_format
from agent.inference.json_schema_grammar import check_schema
from protocol.eval_json import MAX_STARTS, extract_json
from protocol.eval_set import EvalItem, judge_answer

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2.eval.json"
NAME_ALICE = {"kind": "json_schema", "schema": {
    "type": "object", "required": ["name"], "properties": {"name": {"const": "Alice"}}}}


def _text(answer: str) -> str | None:
    found = extract_json(answer)
    return None if found is None else found.text


@pytest.mark.parametrize(("answer", "extracted"), [
    # the answer is the value, stripped
    ('  {"a": 1}\n', '{"a": 1}'),
    ("42", "42"),
    # a json block wins; what the model writes after the fence is ignored
    ('```json\n{"a": 1}\n```\nThis JSON object has a key.', '{"a": 1}'),
    ('Sure:\n```JSON\n[1, 2]\n```', "[1, 2]"),
    # a json block after a bare one still wins; a bare one counts without it
    ('```\nplain\n```\n```json\n{"b": 2}\n```', '{"b": 2}'),
    ('```\n{"c": 3}\n```', '{"c": 3}'),
    # cut by max_tokens: the block runs to the end of the answer
    ('```json\n{"a": 1}\n\nand then', '{"a": 1}'),
    # a block of another language is not JSON: the whole answer is searched
    ('```python\nx = {"d": 4}\n```', '{"d": 4}'),
    # the first complete object or array; text after it is ignored
    ('{"name": "Alice"} is the object you asked for.', '{"name": "Alice"}'),
    ('Here [is] the list: [1, 2] and more', "[1, 2]"),
    ('{"a": {"b": [1, 2]}} {"c": 3}', '{"a": {"b": [1, 2]}}'),
    # brackets and escaped quotes inside strings do not end the value
    ('{"s": "a } \\" ] b"} tail', '{"s": "a } \\" ] b"}'),
    # a bracketed span that is not JSON is skipped whole, nested brackets and all
    ('{name: [Alice]} then {"name": "Alice"}', '{"name": "Alice"}'),
    # an object cut off by max_tokens ends the search: nothing nested in it is taken
    ('```json\n{"name": "Alice", "job": ["M", "J"], "', None),
    ('{"job": ["M", "J"], "note": "never closed', None),
    # a closing fence never opened: the fenced text holds nothing, the answer does
    ('{"a": 1}\n```\nbye', '{"a": 1}'),
    # no JSON at all, or an object that never closes
    ("no json here", None),
    ('{"a": 1, "b": ', None),
])
def test_the_scorer_extracts_the_json_value_by_one_rule(answer: str,
                                                        extracted: str | None) -> None:
    assert _text(answer) == extracted


def test_extraction_parses_a_bounded_number_of_openings() -> None:
    answer = "[sic] " * (MAX_STARTS + 5) + '{"a": 1}'
    assert extract_json(answer) is None  # the object starts past the openings parsed
    assert _text("[sic] " * 3 + '{"a": 1}') == '{"a": 1}'
    assert extract_json("[" * 5000) is None  # nesting too deep for the parser: no value
    assert extract_json("[" * 5000 + "]" * 5000) is None


def test_a_json_schema_item_passes_on_the_extracted_value_and_says_what_it_was() -> None:
    item = EvalItem.model_validate({"id": "j", "prompt": "?", "scorer": NAME_ALICE})
    judged = judge_answer(item.scorer, '```json\n{"name": "Alice"}\n```\nThis object names her.')
    assert judged.passed and judged.extracted == '{"name": "Alice"}'
    wrong = judge_answer(item.scorer, '{"name": "Bob"} and {"name": "Alice"}')
    assert not wrong.passed and wrong.extracted == '{"name": "Bob"}'  # the first one counts
    assert judge_answer(item.scorer, "Alice") == p.eval_set.Judged(False, None)
    other = EvalItem.model_validate({"id": "c", "prompt": "?",
                                     "scorer": {"kind": "contains", "expected": ["x"]}})
    assert judge_answer(other.scorer, "x") == p.eval_set.Judged(True, None)


def _set(item: dict[str, Any]) -> bytes:
    return json.dumps({"schema": "slmfleet.evalset/1", "items": [
        {"id": "s", "prompt": "Answer in JSON.", "scorer": NAME_ALICE, **item}]}).encode()


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {
    "name": "person", "strict": True,
    "schema": {"type": "object", "properties": {"name": {"type": "string"}},
               "required": ["name"], "additionalProperties": False}}}


def test_an_item_carries_an_openai_response_format() -> None:
    parsed = p.parse_eval_set_bytes(_set({"response_format": SCHEMA_FORMAT})).items[0]
    assert worker_format(parsed) == {"type": "json_schema",
                                     "schema": SCHEMA_FORMAT["json_schema"]["schema"]}
    assert item_request(parsed) == {"prompt": "Answer in JSON.", "max_tokens": 32,
                                    "response_format": worker_format(parsed)}
    # as the request carries it to the worker: the OpenAI shape, by its aliases
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["response_format"] == SCHEMA_FORMAT
    loose = p.parse_eval_set_bytes(_set({"response_format": {"type": "json_object"}})).items[0]
    assert worker_format(loose) == {"type": "json_object"}
    plain = p.parse_eval_set_bytes(_set({})).items[0]
    assert plain.response_format is None and "response_format" not in item_request(plain)


@pytest.mark.parametrize(("response_format", "message"), [
    ({"type": "text"}, r"items\.0\.response_format"),
    ({"type": "json_schema"}, r"response_format\.json_schema\.json_schema: Field required"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
     r"json_schema\.name: Field required"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
     r"json_schema\.name: String should match pattern"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": 7}}},
     r"json_schema\.schema: .*schema is not a JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "extra": 1}},
     r"json_schema\.extra: Extra inputs are not permitted"),
    ({"type": "json_object", "schema": {}}, r"json_object\.schema: Extra inputs"),
])
def test_a_bad_response_format_is_refused_naming_the_field(response_format: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(p.MalformedPayload, match=message):
        p.parse_eval_set_bytes(_set({"response_format": response_format}))


def test_a_set_without_response_formats_verifies_and_scores_as_before() -> None:
    data = _set({})
    ref = p.eval_set_ref(data, "m/eval.json")
    parsed = p.parse_eval_set(data, ref)
    assert (ref.items, parsed.items[0].response_format) == (1, None)
    score = p.score_answers(parsed, {"s": '{"name": "Alice"}'})
    assert (score.passed, score.total) == (1, 1)


def test_the_example_set_judges_raw_and_structured_json() -> None:
    items = p.parse_eval_set_bytes(EXAMPLE.read_bytes()).items
    raw = [i for i in items if i.category == "json"]
    structured = [i for i in items if i.category == "json-structured"]
    assert raw and all(i.response_format is None and i.scorer.kind == "json_schema"
                       for i in raw)
    assert structured and all(i.response_format is not None for i in structured)
    assert {i.response_format.type for i in structured} == {"json_object", "json_schema"}
    for item in structured:
        fmt = worker_format(item)
        assert fmt is not None
        if fmt["type"] == "json_schema":
            check_schema(fmt["schema"])  # the agent's grammar can enforce every one
        # the format fixes the shape, the scorer the content: a right-shaped wrong
        # answer fails
        assert not judge_answer(item.scorer, '{"x": "not the answer"}').passed


def test_events_and_the_cache_carry_the_scores_without_the_per_item_results() -> None:
    scores = {"score": 1.0, "passed": 1, "run": 1, "total": 1, "by_category": {},
              "elapsed_s": 0.1, "stopped_early": False,
              "items": [{"id": "s", "passed": True, "extracted": "{}"}]}
    wire = p.EvalScores.model_validate(public_scores(scores))
    assert wire.passed == 1 and "items" not in wire.model_dump()
    with pytest.raises(ValueError, match="items"):
        p.EvalScores.model_validate(scores)
