"""Every field and option of Ollama's ``/api/chat``, ``/api/generate``, ``/api/embed`` and
``/api/embeddings``, and its fate.

As :mod:`.request_fields` does for the OpenAI routes: a field (or a key of
``options``) is honoured, refused with a 400 naming it, or ignored because
it cannot change the answer (documented as such); one the tables do not
know is refused too. docs/inference.md ("Ollama API") carries the same
tables; tests/test_ollama_api.py checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

CHAT, GENERATE, EMBED, EMBEDDINGS = "chat", "generate", "embed", "embeddings"
TEXT = frozenset({CHAT, GENERATE})
ALL = frozenset({CHAT, GENERATE, EMBED, EMBEDDINGS})

Handling = Literal["honoured", "refused", "ignored"]


@dataclass(frozen=True, slots=True)
class Field:
    """How one request field or option is handled; ``neutral`` values ask for nothing."""

    handling: Handling
    routes: frozenset[str]
    note: str
    neutral: tuple[Any, ...] = (None,)


def _refused(note: str, routes: frozenset[str], neutral: tuple[Any, ...] = (None,)) -> Field:
    return Field("refused", routes, note, neutral)


#: top-level request fields of /api/chat, /api/generate, /api/embed, /api/embeddings
FIELDS: dict[str, Field] = {
    "model": Field("honoured", ALL, "`name`, `name:latest`, `name:VERSION` or `name@VERSION`"),
    "messages": Field("honoured", frozenset({CHAT}),
                      "roles system, user, assistant, tool; empty: load only"),
    "prompt": Field("honoured", frozenset({GENERATE, EMBEDDINGS}), "empty: load only"),
    "input": Field("honoured", frozenset({EMBED}), "a string or a list of strings"),
    "system": Field("honoured", frozenset({GENERATE}), "a system message before the prompt"),
    "raw": Field("honoured", frozenset({GENERATE}),
                 "true: the prompt goes to the model as it is, no chat template"),
    "stream": Field("honoured", TEXT, "NDJSON, true by default"),
    "format": Field("honoured", TEXT, "`\"json\"` or a JSON schema (see \"Structured output\")"),
    "options": Field("honoured", ALL, "see the options table"),
    "keep_alive": Field("honoured", ALL, "how long the model stays loaded after the request: "
                        "a duration (`\"5m\"`) or seconds; `0` unloads it right after, "
                        "negative keeps it loaded"),
    "tools": Field("honoured", frozenset({CHAT}),
                   "OpenAI's tool shape; the model chooses between text and calls (see "
                   "\"Tool calls\")"),
    "think": _refused("no thinking models here", TEXT, (None, False)),
    "logprobs": _refused("log probabilities are not returned", TEXT, (None, False)),
    "top_logprobs": _refused("log probabilities are not returned", TEXT, (None, 0)),
    "images": _refused("text only", frozenset({GENERATE}), (None, [])),
    "suffix": _refused("no fill-in-the-middle", frozenset({GENERATE}), (None, "")),
    "template": _refused("the model's own chat template is used", frozenset({GENERATE}),
                         (None, "")),
    "context": _refused("no conversational memory: send the history to /api/chat",
                        frozenset({GENERATE}), (None, [])),
    "width": _refused("text only", frozenset({GENERATE})),
    "height": _refused("text only", frozenset({GENERATE})),
    "steps": _refused("text only", frozenset({GENERATE})),
    "truncate": _refused("inputs longer than the context are always truncated",
                         frozenset({EMBED}), (None, True)),
    "dimensions": _refused("embeddings have the model's own dimension", frozenset({EMBED})),
}

_LOAD_TIME = "load-time setting: the fleet's runtime settings decide"

#: keys of ``options``
OPTIONS: dict[str, Field] = {
    "num_predict": Field("honoured", ALL, "tokens to generate, up to 8192; -1 and -2: until "
                         "the context is full; default `api_default_max_tokens`"),
    "temperature": Field("honoured", ALL, "0 to 2; default 0.8, Ollama's"),
    "top_p": Field("honoured", ALL, "0 to 1; default 0.9, Ollama's"),
    "seed": Field("honoured", ALL, "same seed, same answer on the same model version"),
    "stop": Field("honoured", ALL, "up to 4 strings"),
    "frequency_penalty": Field("honoured", ALL, "-2 to 2"),
    "presence_penalty": Field("honoured", ALL, "-2 to 2"),
    "num_ctx": Field("honoured", ALL, "up to the device's context: the model runs with "
                     "the context the fleet set; above it: 400"),
    "top_k": _refused("sampling uses top_k 40", ALL, (None, 40)),
    "min_p": _refused("sampling uses min_p 0.05", ALL, (None, 0.05)),
    "typical_p": _refused("sampling uses typical_p 1", ALL, (None, 1, 1.0)),
    "repeat_penalty": _refused("sampling uses repeat_penalty 1", ALL, (None, 1, 1.0)),
    "tfs_z": _refused("tail-free sampling is gone from llama.cpp", ALL, (None, 1, 1.0)),
    "mirostat": _refused("no mirostat sampling", ALL, (None, 0)),
    "repeat_last_n": Field("ignored", ALL, "only matters with `repeat_penalty`, which is 1"),
    "mirostat_tau": Field("ignored", ALL, "only matters with `mirostat`, which is 0"),
    "mirostat_eta": Field("ignored", ALL, "only matters with `mirostat`, which is 0"),
    "penalize_newline": Field("ignored", ALL, "Ollama ignores it too"),
    "num_keep": Field("ignored", ALL, "the context is never shifted: a request that does not "
                      "fit is refused"),
    "draft_num_predict": Field("ignored", ALL, "no draft model"),
    **{name: Field("ignored", ALL, _LOAD_TIME) for name in (
        "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
        "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread")},
}

#: what the routes' messages call each route
ROUTE_PATHS = {CHAT: "/api/chat", GENERATE: "/api/generate", EMBED: "/api/embed",
               EMBEDDINGS: "/api/embeddings"}


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # `False == 0` in Python: compare types too (an int neutral also takes its float).
    return any(value == n and (type(value) is type(n) or {type(value), type(n)} == {int, float})
               for n in neutral)


def unsupported(data: dict[str, Any], table: dict[str, Field], route: str,
                where: str = "") -> str | None:
    """Why the first key of ``data`` that ``table`` refuses or does not know on ``route``
    is refused, or None; ``where`` prefixes the names (``options.``)."""
    for name, value in data.items():
        field = table.get(name)
        if field is None or route not in field.routes:
            return f"unknown '{where}{name}' for {ROUTE_PATHS[route]}"
        if field.handling == "refused" and not _neutral(value, field.neutral):
            return f"'{where}{name}' is not supported: {field.note}"
    return None
