"""Every request field of ``/v1/chat/completions`` and ``/v1/completions``, and its fate.

One table, so nothing a client sends is dropped silently: a field is
honoured, refused with ``400 unsupported_parameter`` naming it, or ignored
because it cannot change the answer (documented as such). A field the
table does not know is refused too, as OpenAI's own API does.
docs/inference.md carries the same table; tests/test_request_fields.py
checks the two agree and sends every refused field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

CHAT = "chat"
COMPLETIONS = "completions"
BOTH = frozenset({CHAT, COMPLETIONS})

Handling = Literal["honoured", "refused", "ignored"]


@dataclass(frozen=True, slots=True)
class Field:
    """How one request field is handled.

    ``neutral`` are values that ask for nothing (``null``, ``false``, an
    empty list): a refused field carrying one is accepted as if absent.
    ``refused_example`` is a value answered 400 (for refused fields, and for
    honoured ones with a limit, such as ``n`` above 1).
    """

    handling: Handling
    routes: frozenset[str]
    note: str
    neutral: tuple[Any, ...] = (None,)
    refused_example: Any = None


def _refused(note: str, example: Any, routes: frozenset[str] = BOTH,
             neutral: tuple[Any, ...] = (None,)) -> Field:
    return Field("refused", routes, note, neutral, example)


FIELDS: dict[str, Field] = {
    "model": Field("honoured", BOTH, "the model's name or `name@version`"),
    "messages": Field("honoured", frozenset({CHAT}),
                      "roles system, developer, user, assistant (with `tool_calls`), tool "
                      "(with `tool_call_id`); text content only"),
    "prompt": Field("honoured", frozenset({COMPLETIONS}),
                    "a string, or a list holding one string"),
    "max_tokens": Field("honoured", BOTH, "default `api_default_max_tokens`"),
    "max_completion_tokens": Field("honoured", frozenset({CHAT}), "same as `max_tokens`"),
    "temperature": Field("honoured", BOTH, "0 to 2"),
    "top_p": Field("honoured", BOTH, "0 to 1"),
    "frequency_penalty": Field("honoured", BOTH, "-2 to 2"),
    "presence_penalty": Field("honoured", BOTH, "-2 to 2"),
    "stop": Field("honoured", BOTH, "a string or up to 4"),
    "seed": Field("honoured", BOTH, "same seed, same answer on the same model version"),
    "stream": Field("honoured", BOTH, "server-sent events ending in `data: [DONE]`"),
    "n": Field("honoured", BOTH, "1 only: one choice per request", refused_example=2),
    "response_format": Field(
        "honoured", BOTH, "`text`, `json_object`, `json_schema` (GGUF models; see "
        "\"Structured output\"); ONNX models refuse the JSON types",
        refused_example={"type": "grammar"}),
    "stream_options": Field("ignored", BOTH,
                            "`usage` always rides on the last chunk, "
                            "`include_usage` or not"),
    "user": Field("ignored", BOTH, "an end-user id for abuse tracking; nothing to track"),
    "safety_identifier": Field("ignored", BOTH, "as `user`"),
    "metadata": Field("ignored", frozenset({CHAT}), "tags for stored completions"),
    "store": Field("ignored", frozenset({CHAT}), "nothing is stored either way"),
    "service_tier": Field("ignored", frozenset({CHAT}), "one tier: this device"),
    "prompt_cache_key": Field("ignored", frozenset({CHAT}),
                              "llama.cpp reuses a common prompt prefix by itself"),
    "logprobs": _refused("log probabilities are not returned", True,
                         neutral=(None, False, 0)),
    "top_logprobs": _refused("log probabilities are not returned", 3,
                             frozenset({CHAT}), (None, 0)),
    "logit_bias": _refused("not applied by this server", {"50256": -100}, neutral=(None, {})),
    "tools": Field("honoured", frozenset({CHAT}),
                   "up to 64 `function` tools (GGUF models; see \"Tool calls\")",
                   refused_example=[{"type": "custom", "custom": {"name": "f"}}]),
    "tool_choice": Field("honoured", frozenset({CHAT}),
                         "`auto`, `none`, `required` or a named function"),
    "parallel_tool_calls": Field("honoured", frozenset({CHAT}),
                                 "`false`: exactly one call; `true` (the default): up to 8"),
    "functions": _refused("the deprecated functions API; use `tools`",
                          [{"name": "f", "parameters": {}}], frozenset({CHAT}), (None, [])),
    "function_call": _refused("the deprecated functions API; use `tool_choice`", "auto",
                              frozenset({CHAT}), (None, "none")),
    "audio": _refused("text only", {"voice": "alloy", "format": "wav"}, frozenset({CHAT})),
    "modalities": _refused("text only", ["text", "audio"], frozenset({CHAT}),
                           (None, ["text"])),
    "prediction": _refused("predicted outputs are not supported",
                           {"type": "content", "content": "x"}, frozenset({CHAT})),
    "reasoning_effort": _refused("no reasoning models here", "low", frozenset({CHAT})),
    "verbosity": _refused("not applied by this server", "low", frozenset({CHAT})),
    "web_search_options": _refused("no web search on a device", {}, frozenset({CHAT})),
    "echo": _refused("the prompt is not echoed", True, frozenset({COMPLETIONS}),
                     (None, False)),
    "best_of": _refused("one candidate per request", 2, frozenset({COMPLETIONS}), (None, 1)),
    "suffix": _refused("no fill-in-the-middle", "}", frozenset({COMPLETIONS}), (None, "")),
}


def route_name(route: str) -> str:
    """The URL path of a route key."""
    return "/v1/chat/completions" if route == CHAT else "/v1/completions"


def unsupported(data: dict[str, Any], route: str) -> tuple[str, str] | None:
    """(field, message) for the first field ``data`` may not carry on ``route``, or None.

    Limits of honoured fields (``n`` above 1, a bad ``response_format``) are
    checked where those fields are read; this catches unknown and refused ones.
    """
    for name, value in data.items():
        field = FIELDS.get(name)
        if field is None or route not in field.routes:
            return name, f"unknown parameter '{name}' for {route_name(route)}"
        if field.handling == "refused" and not _neutral(value, field.neutral):
            return name, f"'{name}' is not supported: {field.note}"
    return None


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # `False == 0` in Python: compare types too, so `logprobs: 0` and `false` both
    # count only where the table lists them.
    return any(value == n and type(value) is type(n) for n in neutral)
