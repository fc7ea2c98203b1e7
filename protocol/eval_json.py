"""The JSON value an answer holds, the way the ``json_schema`` scorer reads it.

Small models asked for JSON rarely answer with JSON alone: they wrap it in
a Markdown code block, or write on after the closing brace. A structured
output user (and an evaluation harness) takes the value and ignores the
rest, so the scorer does too, by one fixed rule (:func:`extract_json`):

1. The text to search is the content of the first code block fenced with
   ```` ```json ```` (the label in any case), or, without one, of the first
   bare ```` ``` ```` block, up to its closing fence or the end of the
   answer (an answer cut by ``max_tokens`` may never close it); with
   neither, or when that block holds no JSON value, the whole answer.
2. In that text the value is the whole text, stripped, when that is one
   JSON value; otherwise the first complete JSON object or array: at the
   earliest ``{`` or ``[`` where one parses (Python's
   ``json.JSONDecoder.raw_decode``), whatever follows it ignored.

Bounded work: the caller cuts answers to ``MAX_SCORED_CHARS`` first, and
at most :data:`MAX_STARTS` openings are tried.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: ``{`` / ``[`` positions tried as the start of a value (bounds the scan)
MAX_STARTS = 64

#: a fence's opening line: three backticks, an optional label, the end of the line
_OPENING = re.compile(r"```([A-Za-z0-9_+.-]*)[ \t]*(?:\r?\n|(?=[{\[]))")
_STARTS = re.compile(r"[{\[]")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Extracted:
    """The value found in an answer and the text it was read from."""

    value: Any
    text: str


def _fenced(answer: str) -> str | None:
    """The content of the first ``json`` block, else of the first bare one (None: no block)."""
    bare: str | None = None
    at = 0
    while (opening := _OPENING.search(answer, at)) is not None:
        end = answer.find("```", opening.end())
        content = answer[opening.end():] if end < 0 else answer[opening.end():end]
        label = opening.group(1).lower()
        if label == "json":
            return content
        if not label and bare is None:
            bare = content
        if end < 0:
            break
        at = end + 3
    return bare


def extract_json(answer: str) -> Extracted | None:
    """The JSON value ``answer`` holds by the module's rule, or None when it holds none."""
    fenced = _fenced(answer)
    if fenced is not None and (found := _value_in(fenced)) is not None:
        return found
    return _value_in(answer)


def _value_in(text: str) -> Extracted | None:
    """The whole stripped ``text`` as one value, else its first complete object or array."""
    stripped = text.strip()
    try:
        return Extracted(json.loads(stripped), stripped)
    except (ValueError, RecursionError):
        pass
    for tried, start in enumerate(_STARTS.finditer(text)):
        if tried >= MAX_STARTS:
            break
        try:
            value, end = _DECODER.raw_decode(text, start.start())
        except (ValueError, RecursionError):
            continue
        return Extracted(value, text[start.start():end])
    return None
