"""Request validation and response shapes of the local OpenAI-compatible API.

Validation is by hand rather than with pydantic models: these few fields
are checked in a few lines, and every model class the agent builds costs
resident memory on devices with a tight budget. Which fields the two
generation routes honour, refuse or ignore is tabled in
:mod:`.request_fields`; anything else is refused, never dropped silently.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

from .request_fields import CHAT, COMPLETIONS, unsupported
from .tool_calls import ToolError, ToolPlan, parse_openai

ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
#: longest list of stop strings (OpenAI's own limit)
MAX_STOP = 4
#: most texts in one embeddings request
MAX_EMBED_INPUTS = 256


class ApiError(Exception):
    """A request answered with an error status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, code: str = "invalid_request",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI clients parse it."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on one request."""

    max_prompt_chars: int = 64 * 1024
    default_max_tokens: int = 512
    max_tokens: int = 8192


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") \
            from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string", param="model")
    return model


def _number(data: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be a number from {lo:g} to {hi:g}", param=name)
    return float(value)


def _int(data: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be an integer from {lo} to {hi}", param=name)
    return value


def _text(content: Any, where: str) -> str:
    """Message content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}: only text content parts are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts",
                   param="messages")


def _fields(data: dict[str, Any], route: str) -> None:
    """Refuse what the route does not support, naming the field (see request_fields)."""
    bad = unsupported(data, route)
    if bad is not None:
        raise ApiError(400, bad[1], code="unsupported_parameter", param=bad[0])


#: keys of ``response_format.json_schema``
_JSON_SCHEMA_KEYS = frozenset({"name", "schema", "strict", "description"})


def _response_format(data: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's ``response_format`` (None: free text), or a 400 saying what is wrong.

    The schema is checked here, in the agent, so an unsupported keyword is a
    400 before the request queues for the worker; the converter is stdlib
    only and imported just for requests that carry a schema.
    """
    fmt = data.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'response_format' must be {\"type\": \"text\"}, "
                       "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                       "\"json_schema\": {\"name\", \"schema\"}}",
                       code="unsupported_parameter", param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, "'response_format.json_schema' must be an object with a "
                       "'schema' object", param="response_format")
    extra = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if extra:
        raise ApiError(400, f"'response_format.json_schema.{extra[0]}' is not supported",
                       code="unsupported_parameter", param="response_format")
    name = spec.get("name")
    if not (isinstance(name, str) and 0 < len(name) <= 64):
        raise ApiError(400, "'response_format.json_schema.name' must be a string of 1 to 64 "
                       "characters", param="response_format")
    if not isinstance(spec.get("strict", False), bool | None):
        raise ApiError(400, "'response_format.json_schema.strict' must be true or false",
                       param="response_format")
    from .json_schema_grammar import UnsupportedSchema, check_schema

    try:
        check_schema(spec["schema"])
    except UnsupportedSchema as exc:
        raise ApiError(400, f"response_format.json_schema.schema: {exc}", code=exc.code,
                       param="response_format") from None
    except RecursionError:
        raise ApiError(400, "response_format.json_schema.schema nests too deep",
                       code="unsupported_schema", param="response_format") from None
    return {"type": "json_schema", "schema": spec["schema"]}


def _sampling(data: dict[str, Any], limits: Limits) -> dict[str, Any]:
    n = data.get("n", 1)
    if n is not None and n != 1:
        raise ApiError(400, "'n' must be 1: one choice per request",
                       code="unsupported_parameter", param="n")
    max_tokens = _int(data, "max_completion_tokens", 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _int(data, "max_tokens", 1, limits.max_tokens)
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP
                                 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} "
                       "non-empty strings", param="stop")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    return {
        "max_tokens": max_tokens or limits.default_max_tokens,
        "temperature": _number(data, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(data, "top_p", 0.0, 1.0, 1.0),
        "stop": stop or [],
        "seed": _int(data, "seed", -(2**63), 2**63 - 1),
        "frequency_penalty": _number(data, "frequency_penalty", -2.0, 2.0, 0.0),
        "presence_penalty": _number(data, "presence_penalty", -2.0, 2.0, 0.0),
        "response_format": _response_format(data),
    }


def _check_size(chars: int, limits: Limits) -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(413, f"prompt is {chars} characters, limit {limits.max_prompt_chars}",
                       code="prompt_too_long", param="messages")


def chat_request(data: dict[str, Any], limits: Limits) -> tuple[str, bool, dict[str, Any]]:
    """(model, stream, worker request) for ``/v1/chat/completions``."""
    _fields(data, CHAT)
    model = _model(data)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    clean: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role ({', '.join(sorted(ROLES))})",
                           param="messages")
        clean.append(_message(message, i, calls))
    _check_size(sum(len(m["content"] or "") + sum(len(c["function"]["arguments"])
                                                  for c in m.get("tool_calls", ()))
                    for m in clean), limits)
    request = {"messages": clean, **_sampling(data, limits)}
    plan = _tools(data)
    if plan is not None:
        if plan.calls_possible and request["response_format"] is not None:
            raise ApiError(400, "'response_format' with 'tools' is supported with "
                           "tool_choice \"none\" only", code="unsupported_parameter",
                           param="response_format")
        request["tools"] = plan.wire()
    return model, bool(data.get("stream")), request


def _message(message: dict[str, Any], i: int, calls: set[str]) -> dict[str, Any]:
    """One chat message, with an assistant's ``tool_calls`` and a tool result's id.

    ``calls`` collects the ids of the calls so far: a tool result must answer one.
    """
    role, where = message["role"], f"messages[{i}]"
    tool_calls = message.get("tool_calls")
    if role == "assistant" and tool_calls:
        content = message.get("content")
        clean = {"role": role, "content": None if content is None else _text(content, where),
                 "tool_calls": [_earlier_call(c, f"{where}.tool_calls[{j}]")
                                for j, c in enumerate(_listed(tool_calls, where))]}
        calls.update(c["id"] for c in clean["tool_calls"])
        return clean
    if tool_calls is not None and tool_calls != []:
        raise ApiError(400, f"{where}: only assistant messages carry 'tool_calls'",
                       param="messages")
    clean = {"role": role, "content": _text(message.get("content", ""), where)}
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in calls:
            raise ApiError(400, f"{where}: a tool message needs the 'tool_call_id' of an "
                           "earlier assistant message's tool call", param="messages")
        clean["tool_call_id"] = call_id
    return clean


def _listed(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ApiError(400, f"{where}: 'tool_calls' must be a list", param="messages")
    return value


def _earlier_call(call: Any, where: str) -> dict[str, Any]:
    """An assistant message's tool call, as OpenAI shapes it."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(call, dict) and call.get("type", "function") == "function"
            and isinstance(call.get("id"), str) and isinstance(fn, dict)
            and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
        raise ApiError(400, f"{where} must be {{\"id\", \"type\": \"function\", "
                       "\"function\": {\"name\", \"arguments\": <JSON text>}}",
                       param="messages")
    return {"id": call["id"], "type": "function",
            "function": {"name": fn["name"], "arguments": fn["arguments"]}}


def _tools(data: dict[str, Any]) -> ToolPlan | None:
    """The request's tools and tool choice, or a 400 naming the field."""
    try:
        return parse_openai(data.get("tools"), data.get("tool_choice"),
                            data.get("parallel_tool_calls"))
    except ToolError as exc:
        raise ApiError(400, str(exc), code=exc.code, param=exc.param) from None


def completion_request(data: dict[str, Any], limits: Limits) -> tuple[str, bool, dict[str, Any]]:
    """(model, stream, worker request) for ``/v1/completions``."""
    _fields(data, COMPLETIONS)
    model = _model(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    _check_size(len(prompt), limits)
    request = {"prompt": prompt, **_sampling(data, limits)}
    return model, bool(data.get("stream")), request


def embeddings_request(data: dict[str, Any], limits: Limits) -> tuple[str, list[str]]:
    """(model, texts) for ``/v1/embeddings``."""
    model = _model(data)
    texts = data.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not (isinstance(texts, list) and 0 < len(texts) <= MAX_EMBED_INPUTS
            and all(isinstance(t, str) and t for t in texts)):
        raise ApiError(400, f"'input' must be a non-empty string or a list of 1 to "
                       f"{MAX_EMBED_INPUTS} non-empty strings", param="input")
    embedding_encoding(data)
    _check_size(sum(len(t) for t in texts), limits)
    return model, texts


def embedding_encoding(data: dict[str, Any]) -> str:
    """The request's ``encoding_format``: ``float`` (the default) or ``base64``.

    The official OpenAI clients ask for ``base64`` unless told otherwise (and
    decode it themselves), so refusing it would fail their plain
    ``embeddings.create(...)``.
    """
    fmt = data.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be 'float' or 'base64'",
                       param="encoding_format")
    return str(fmt)


def pooled(vector: list[Any]) -> list[float]:
    """One vector per input, as OpenAI and Ollama answer: a model whose GGUF sets no
    pooling gives one vector per token, averaged here (as the agent pools ONNX
    embedders)."""
    if not vector or not isinstance(vector[0], list):
        return vector
    return [sum(column) / len(vector) for column in zip(*vector, strict=True)]


def encoded_embedding(vector: list[float], fmt: str) -> list[float] | str:
    """One embedding as the response carries it: the list of floats, or for
    ``base64`` its little-endian float32 bytes in base64 (what OpenAI sends)."""
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def infer_request(data: dict[str, Any]) -> tuple[str, dict[str, Any], list[str] | None]:
    """(model, inputs, outputs) for the generic ``/v1/infer`` (ONNX by name)."""
    model = _model(data)
    inputs, outputs = data.get("inputs"), data.get("outputs")
    if not isinstance(inputs, dict) or not inputs:
        raise ApiError(400, "'inputs' must be an object of input name -> nested list",
                       param="inputs")
    if outputs is not None and not (isinstance(outputs, list)
                                    and all(isinstance(o, str) for o in outputs)):
        raise ApiError(400, "'outputs' must be a list of output names", param="outputs")
    return model, inputs, outputs


# -- responses ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_response(rid: str, ref: str, text: str | None, done: dict[str, Any],
                  tool_calls: list[dict[str, Any]] | None = None,
                  finish: str | None = None) -> dict[str, Any]:
    """A non-streamed ``chat.completion``; ``finish`` overrides the worker's finish reason."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": ref,
        "system_fingerprint": ref,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish or done["finish_reason"]}],
        "usage": usage(done["prompt_tokens"], done["completion_tokens"]),
    }


def call_id() -> str:
    """A tool call's id, as OpenAI's look (``call_...``)."""
    return f"call_{secrets.token_hex(12)}"


def tool_call(cid: str, name: str, arguments: str) -> dict[str, Any]:
    """A whole tool call of an answer's message."""
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_call_start(index: int, cid: str, name: str) -> dict[str, Any]:
    """The delta that opens streamed tool call ``index``."""
    return {"tool_calls": [{"index": index, "id": cid, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def tool_call_arguments(index: int, text: str) -> dict[str, Any]:
    """The delta that carries more of tool call ``index``'s arguments."""
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def chat_chunk(rid: str, ref: str, delta: dict[str, Any], finish: str | None = None,
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``."""
    chunk: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": ref, "system_fingerprint": ref,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        chunk["usage"] = use
    return chunk


def text_response(rid: str, ref: str, text: str, done: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed ``text_completion``."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": ref,
        "system_fingerprint": ref,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": done["finish_reason"]}],
        "usage": usage(done["prompt_tokens"], done["completion_tokens"]),
    }


def text_chunk(rid: str, ref: str, text: str, finish: str | None = None,
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    chunk: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": ref,
        "system_fingerprint": ref,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        chunk["usage"] = use
    return chunk
