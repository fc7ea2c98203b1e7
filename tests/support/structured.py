"""The structured-output check shared by tests/test_structured_output.py and
bench/structured_output.py: one schema, one prompt, one verdict per seed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema

#: a string enum, an integer range, a nested array (maxItems) of strings (maxLength)
BASKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 3, "maximum": 117},
        "shelf": {"type": "object", "properties": {
            "tags": {"type": "array", "maxItems": 3,
                     "items": {"type": "string", "maxLength": 12}}},
            "required": ["tags"], "additionalProperties": False},
    },
    "required": ["color", "count", "shelf"],
    "additionalProperties": False,
}
PROMPT = "Describe a fruit basket as JSON: its color, how many fruits, and a few tags."
#: ample for the schema's longest answer (3 tags of 12 characters, indented)
MAX_TOKENS = 160


def response_format(schema: dict[str, Any] = BASKET_SCHEMA) -> dict[str, Any]:
    """OpenAI's ``json_schema`` response_format for ``schema``."""
    return {"type": "json_schema",
            "json_schema": {"name": "basket", "schema": schema, "strict": True}}


def temperature(seed: int) -> float:
    """0.3 to 1.0, varied with the seed so sampling is really random."""
    return round(0.3 + (seed % 8) * 0.1, 2)


@dataclass(frozen=True)
class Verdict:
    """One answer: its text, why it ended, and what (if anything) is wrong with it."""

    seed: int
    text: str
    finish_reason: str | None
    problem: str | None


def judge(seed: int, text: str, finish: str | None,
          schema: dict[str, Any] = BASKET_SCHEMA) -> Verdict:
    """Parse and validate an answer; a ``length`` finish is a failure too."""
    problem = None
    if finish != "stop":
        problem = f"finish_reason {finish!r}"
    else:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return Verdict(seed, text, finish, problem)


def ask(client: Any, model: str, seed: int, stream: bool) -> Verdict:
    """One ``json_schema`` chat request through the official ``openai`` client."""
    kwargs = {"model": model, "seed": seed, "temperature": temperature(seed),
              "max_tokens": MAX_TOKENS, "response_format": response_format(),
              "messages": [{"role": "user", "content": PROMPT}]}
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        choice = reply.choices[0]
        return judge(seed, choice.message.content, choice.finish_reason)
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return judge(seed, "".join(text), finish)
