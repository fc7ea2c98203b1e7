"""Ollama's API in the agent's terms: requests translated, answers shaped.

Pure: no I/O. An Ollama request is checked against the tables of
:mod:`.ollama_fields` (every field and every ``options`` key is honoured,
refused with a 400 naming it, or ignored because it cannot change the
answer), then translated into the OpenAI-shaped body :mod:`.schemas`
validates, so both front ends hand the worker the same request dict.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import schemas
from .ollama_fields import (
    CHAT,
    EMBED,
    EMBEDDINGS,
    FIELDS,
    GENERATE,
    OPTIONS,
    Field,
    unsupported,
)
from .schemas import ApiError, Limits
from .tool_calls import ToolPlan, read_reply


class OllamaError(ApiError):
    """An error answered in Ollama's shape, ``{"error": "..."}`` (what its clients read)."""

    def body(self) -> dict[str, Any]:
        """``{"error": message}``."""
        return {"error": str(self)}


#: Ollama's own sampling defaults, where they differ from the OpenAI routes
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_p": 0.9}
#: Ollama option -> the OpenAI-shaped field :mod:`.schemas` checks
_SAMPLING = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty")

def _check(data: dict[str, Any], table: dict[str, Field], route: str, where: str) -> None:
    """400 for the first key of ``data`` that ``table`` refuses or does not know on ``route``."""
    problem = unsupported(data, table, route, where)
    if problem is not None:
        raise OllamaError(400, problem)


# -- names --------------------------------------------------------------------------------


def display_name(name: str, version: str) -> str:
    """The Ollama-style name of a served version: ``name:version``."""
    return f"{name}:{version}"


def resolve_name(asked: str, name: str, version: str) -> str | None:
    """The runtime's model for ``asked`` (``name`` or ``name@version``), or None.

    ``name`` and ``name:latest`` follow whatever version the fleet serves
    (a swap while the request waits moves it to the new one);
    ``name:VERSION`` and ``name@VERSION`` pin the version.
    """
    base, sep, tag = asked.partition("@") if "@" in asked else asked.partition(":")
    if base != name:
        return None
    if not sep or (tag == "latest" and "@" not in asked):
        return name
    return f"{name}@{version}" if tag == version else None


def not_found(asked: str) -> OllamaError:
    """Ollama's answer for a model it does not have, word for word (apps match on it;
    ``/api/tags`` lists what is served)."""
    return OllamaError(404, f"model '{asked}' not found")


# -- requests ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextRequest:
    """A checked /api/chat or /api/generate request.

    ``request`` is the worker's request dict, None for a load-only request
    (no messages, no prompt): the model is loaded already, nothing to run.
    """

    model: str
    stream: bool
    request: dict[str, Any] | None
    #: how long the model stays loaded afterwards (see :func:`keep_alive`)
    keep_alive: float | None = None


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise OllamaError(400, "'model' is required and must be a string")
    return model


def _bool(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OllamaError(400, f"'{name}' must be true or false")
    return value


#: Go's duration units (Ollama parses ``keep_alive`` with ``time.ParseDuration``)
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")
_KEEP_ALIVE_ERROR = ("'keep_alive' must be a duration such as \"5m\" or \"1h30m\", or a "
                     "number of seconds")


def keep_alive(data: dict[str, Any]) -> float | None:
    """Seconds the request's ``keep_alive`` keeps the model loaded: None when absent
    (the agent's default), 0 to unload right after, infinity for a negative one
    (keep it loaded), as Ollama reads it."""
    value = data.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise OllamaError(400, _KEEP_ALIVE_ERROR)
    if isinstance(value, str):
        seconds = _duration(value.strip())
    else:
        seconds = float(value)
        if math.isnan(seconds):
            raise OllamaError(400, _KEEP_ALIVE_ERROR)
    return math.inf if seconds < 0 else seconds


def _duration(text: str) -> float:
    """A Go duration (``"5m"``, ``"-1h"``, ``"1h30m"``) or a plain number, in seconds."""
    with contextlib.suppress(ValueError):
        number = float(text)
        if not math.isnan(number):
            return number
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION.findall(body)
    if not body or "".join(a + b for a, b in parts) != body:
        raise OllamaError(400, _KEEP_ALIVE_ERROR)
    return sign * sum(float(a) * _UNITS[b] for a, b in parts)


def _options(data: dict[str, Any], route: str, limits: Limits, context: int
             ) -> tuple[dict[str, Any], bool]:
    """(OpenAI-shaped sampling fields, whether num_predict asks for the whole context)."""
    options = data.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise OllamaError(400, "'options' must be an object")
    _check(options, OPTIONS, route, "options.")
    fields = {**OLLAMA_DEFAULTS,
              **{name: options[name] for name in _SAMPLING if options.get(name) is not None}}
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and (isinstance(num_ctx, bool) or not isinstance(num_ctx, int)
                                or num_ctx < 1):
        raise OllamaError(400, "'options.num_ctx' must be a positive integer")
    if num_ctx is not None and num_ctx > context:
        raise OllamaError(400, f"'options.num_ctx' ({num_ctx}) is above this device's context "
                          f"of {context} tokens, which the fleet sets")
    predict = options.get("num_predict")
    if predict is None:
        return fields, False
    if isinstance(predict, bool) or not isinstance(predict, int) \
            or not (predict in (-1, -2) or 1 <= predict <= limits.max_tokens):
        raise OllamaError(400, f"'options.num_predict' must be -1 or -2 (until the context is "
                          f"full) or an integer from 1 to {limits.max_tokens}")
    if predict < 0:
        return fields, True
    return {**fields, "max_tokens": predict}, False


def _format(data: dict[str, Any]) -> dict[str, Any]:
    """``format`` as the OpenAI-shaped ``response_format`` field (or nothing)."""
    fmt = data.get("format")
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "format", "schema": fmt}}}
    raise OllamaError(400, "'format' must be \"json\" or a JSON schema object")


def _translated(exc: ApiError) -> OllamaError:
    """A 400 from :mod:`.schemas` in the names an Ollama caller sent."""
    message = str(exc).replace("response_format.json_schema.schema", "format")
    if exc.param in _SAMPLING:
        message = message.replace(f"'{exc.param}'", f"'options.{exc.param}'", 1)
    return OllamaError(exc.status, message, headers=exc.headers)


def _worker_request(build: Callable[[dict[str, Any], Limits], tuple[str, bool, dict[str, Any]]],
                    body: dict[str, Any], limits: Limits, whole_context: bool) -> dict[str, Any]:
    """The worker's request from ``build`` (a :mod:`.schemas` checker) on ``body``."""
    try:
        _, _, request = build(body, limits)
    except OllamaError:
        raise
    except ApiError as exc:
        raise _translated(exc) from None
    if whole_context:
        # The worker fills what the context leaves after the prompt.
        request["max_tokens"] = None
    return request


_MESSAGE_KEYS = frozenset({"role", "content", "images", "thinking", "tool_calls", "tool_name"})
_MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _message(i: int, message: Any, calls: list[tuple[str, str]]) -> dict[str, Any]:
    """One Ollama message as an OpenAI-shaped one.

    Ollama names no call ids: an earlier assistant call gets one here, and a
    ``tool`` result answers the earliest unanswered call of its ``tool_name``
    (or, without a name, the earliest unanswered call). ``calls`` holds the
    unanswered (id, name) pairs so far.
    """
    if not isinstance(message, dict) or message.get("role") not in _MESSAGE_ROLES:
        raise OllamaError(400, f"messages[{i}] needs a role (system, user, assistant, tool)")
    extra = sorted(set(message) - _MESSAGE_KEYS)
    if extra:
        raise OllamaError(400, f"messages[{i}].{extra[0]} is not supported")
    if message.get("images"):
        raise OllamaError(400, f"messages[{i}].images: text only")
    content = message.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise OllamaError(400, f"messages[{i}].content must be a string")
    # `thinking` (an earlier answer's reasoning) is not sent back to the model, as Ollama
    # does for models without thinking.
    out: dict[str, Any] = {"role": message["role"], "content": content}
    if message.get("tool_calls"):
        if message["role"] != "assistant":
            raise OllamaError(400, f"messages[{i}]: only assistant messages carry 'tool_calls'")
        out["tool_calls"] = [_earlier_call(i, j, call, calls)
                             for j, call in enumerate(_listed(i, message["tool_calls"]))]
    elif message["role"] == "tool":
        out["tool_call_id"] = _answered(i, message.get("tool_name"), calls)
    return out


def _listed(i: int, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise OllamaError(400, f"messages[{i}].tool_calls must be a list")
    return value


def _earlier_call(i: int, j: int, call: Any, calls: list[tuple[str, str]]) -> dict[str, Any]:
    """An earlier call ``{"function": {"name", "arguments": {...}}}`` in OpenAI's shape."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
            and isinstance(fn.get("arguments", {}), dict)):
        raise OllamaError(400, f"messages[{i}].tool_calls[{j}] must be "
                          "{\"function\": {\"name\", \"arguments\": {...}}}")
    call_id = f"call_{i}_{j}"
    calls.append((call_id, fn["name"]))
    return {"id": call_id, "type": "function",
            "function": {"name": fn["name"], "arguments": json.dumps(fn.get("arguments", {}))}}


def _answered(i: int, name: Any, calls: list[tuple[str, str]]) -> str:
    """The id of the call a ``tool`` message answers (see :func:`_message`)."""
    if name is not None and not isinstance(name, str):
        raise OllamaError(400, f"messages[{i}].tool_name must be a string")
    for k, (call_id, called) in enumerate(calls):
        if name is None or called == name:
            del calls[k]
            return call_id
    which = f"of {name!r} " if name else ""
    raise OllamaError(400, f"messages[{i}]: a tool result needs an earlier assistant "
                      f"tool call {which}to answer")


def chat_request(data: dict[str, Any], limits: Limits, context: int) -> TextRequest:
    """A checked ``/api/chat`` body; ``context`` is the served model's context in tokens."""
    tools = _tools(data.get("tools"))
    _check(data, FIELDS, CHAT, "")
    model, stream = _model(data), _bool(data, "stream", True)
    messages = data.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise OllamaError(400, "'messages' must be a list")
    sampling, whole = _options(data, CHAT, limits, context)
    fmt = _format(data)
    if not messages:
        return TextRequest(model, stream, None, keep_alive(data))
    calls: list[tuple[str, str]] = []
    body = {"model": model, "messages": [_message(i, m, calls) for i, m in enumerate(messages)],
            **sampling, **fmt, **tools}
    return TextRequest(model, stream, _worker_request(schemas.chat_request, body, limits, whole),
                       keep_alive(data))


def _tools(tools: Any) -> dict[str, Any]:
    """The OpenAI-shaped fields for Ollama's ``tools`` (its tool shape is OpenAI's).

    Ollama has no ``tool_choice``: the model decides (``auto``), and may call
    several tools at once.
    """
    if tools is None or tools == []:
        return {}
    if not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools)):
        raise OllamaError(400, "'tools' must be a list of {\"type\": \"function\", "
                          "\"function\": {\"name\", \"parameters\"}}")
    return {"tools": [{"type": "function", **t} for t in tools], "tool_choice": "auto"}


def generate_request(data: dict[str, Any], limits: Limits, context: int) -> TextRequest:
    """A checked ``/api/generate`` body: a chat turn, or (``raw``) a plain completion."""
    _check(data, FIELDS, GENERATE, "")
    model, stream = _model(data), _bool(data, "stream", True)
    raw = _bool(data, "raw", False)
    prompt, system = data.get("prompt"), data.get("system")
    if prompt is not None and not isinstance(prompt, str):
        raise OllamaError(400, "'prompt' must be a string")
    if system is not None and not isinstance(system, str):
        raise OllamaError(400, "'system' must be a string")
    if raw and system:
        raise OllamaError(400, "'system' has no place in a raw prompt: write it into 'prompt'")
    sampling, whole = _options(data, GENERATE, limits, context)
    fmt = _format(data)
    if not prompt:
        return TextRequest(model, stream, None, keep_alive(data))
    if raw:
        body = {"model": model, "prompt": prompt, **sampling, **fmt}
        return TextRequest(model, stream,
                           _worker_request(schemas.completion_request, body, limits, whole),
                           keep_alive(data))
    messages = ([{"role": "system", "content": system}] if system else []) \
        + [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, **sampling, **fmt}
    return TextRequest(model, stream, _worker_request(schemas.chat_request, body, limits, whole),
                       keep_alive(data))


def embed_request(data: dict[str, Any], route: str, limits: Limits, context: int
                  ) -> tuple[str, list[str]]:
    """(model, texts) of ``/api/embed`` (``input``) or ``/api/embeddings`` (``prompt``).

    No texts (an empty input): load only. Options are checked like those of
    the text routes; only ``num_ctx`` bears on embeddings.
    """
    _check(data, FIELDS, route, "")
    model = _model(data)
    keep_alive(data)
    _options(data, route, limits, context)
    name = "input" if route == EMBED else "prompt"
    texts = data.get(name)
    if texts is None or texts == "" or texts == []:
        return model, []
    if route == EMBEDDINGS and not isinstance(texts, str):
        raise OllamaError(400, "'prompt' must be a string")
    try:
        _, checked = schemas.embeddings_request({"model": model, "input": texts}, limits)
    except ApiError as exc:
        raise OllamaError(exc.status, str(exc).replace("'input'", f"'{name}'")) from None
    return model, checked


# -- answers -----------------------------------------------------------------------------


def now() -> str:
    """``created_at``: RFC 3339 in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def stamp(unix_time: float) -> str:
    """A Unix time as RFC 3339 in UTC (``expires_at``)."""
    return datetime.fromtimestamp(unix_time, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Timing:
    """Ollama's durations of one answer, in nanoseconds."""

    total: int
    load: int
    prompt_eval: int
    eval: int


def chunk(route: str, model: str, text: str) -> dict[str, Any]:
    """One streamed piece of an answer."""
    key, value = (("message", {"role": "assistant", "content": text}) if route == CHAT
                  else ("response", text))
    return {"model": model, "created_at": now(), key: value, "done": False}


def chat_message(text: str, request: dict[str, Any] | None) -> dict[str, Any]:
    """The assistant's message for an answer's ``text``."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if request is not None and request.get("tools"):
        message["content"], message["tool_calls"] = _tool_calls(text, request)
    return message


def _tool_calls(text: str, request: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(text, ``[{"function": {"name", "arguments": {...}}}]``) of an answer that may call
    tools, read from the envelope the worker's grammar held the model to."""
    reply = read_reply(ToolPlan.from_wire(request["tools"]), text)
    calls = []
    for call in reply.calls:
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            arguments = {}  # cut by num_predict before the call closed: done_reason says so
        calls.append({"function": {"name": call.name, "arguments": arguments}})
    return reply.content or "", calls


def final(route: str, model: str, body: Any, done: dict[str, Any] | None,
          timing: Timing | None, unloaded: bool = False) -> dict[str, Any]:
    """The last object of an answer (the only one when not streamed).

    ``body`` is the message (chat) or the text (generate): empty when
    streamed. ``done`` None: a load-only request, answered ``done_reason: "load"``
    (``"unload"`` when it asked, with ``keep_alive: 0``, to unload the model).
    """
    key = "message" if route == CHAT else "response"
    out: dict[str, Any] = {"model": model, "created_at": now(), key: body, "done": True}
    if done is None:
        out["done_reason"] = "unload" if unloaded else "load"
        return out
    assert timing is not None
    out.update(done_reason=done["finish_reason"], total_duration=timing.total,
               load_duration=timing.load, prompt_eval_count=done["prompt_tokens"],
               prompt_eval_duration=timing.prompt_eval, eval_count=done["completion_tokens"],
               eval_duration=timing.eval)
    return out


def normalized(vector: list[float]) -> list[float]:
    """``vector`` scaled to length 1, as Ollama's ``/api/embed`` answers."""
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm > 0 else vector
