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
   JSON value; otherwise the first top-level ``{...}`` or ``[...]`` that
   parses as JSON (Python's ``json.JSONDecoder.raw_decode``), whatever
   follows it ignored. Top-level: not inside an earlier bracket. A bracketed
   span that does not parse (``[sic]`` in prose) is skipped whole; one left
   open ends the search, so what is nested in an object the model never
   finished (an answer cut by ``max_tokens``) is not taken for the answer.

Bounded work: the caller cuts answers to ``MAX_SCORED_CHARS`` first, the
scan is one pass, and at most :data:`MAX_STARTS` openings are parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: top-level ``{`` / ``[`` positions parsed as the start of a value (bounds the work)
MAX_STARTS = 64

#: a fence's opening line: three backticks, an optional label, the end of the line
_OPENING = re.compile(r"```([A-Za-z0-9_+.-]*)[ \t]*(?:\r?\n|(?=[{\[]))")
#: what moves the bracket scan: brackets, and inside them the strings
_SIGNIFICANT = re.compile(r'[{}\[\]"]')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
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
    for tried, start in enumerate(_top_level_openings(text)):
        if tried >= MAX_STARTS:
            break
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        return Extracted(value, text[start:end])
    return None


def _top_level_openings(text: str) -> Iterator[int]:
    """Positions of the ``{`` and ``[`` not inside an earlier bracket, in order.

    Strings count only inside brackets (prose has stray quotes); the kind of
    bracket is not matched, only the depth, which is all the scan needs.
    """
    depth, at = 0, 0
    while (found := _SIGNIFICANT.search(text, at)) is not None:
        char, at = found.group(), found.end()
        if char in "{[":
            if depth == 0:
                yield found.start()
            depth += 1
        elif char in "}]":
            depth = max(depth - 1, 0)
        elif depth > 0:  # a string inside brackets: skip it whole
            string = _STRING.match(text, found.start())
            if string is None:
                return  # never closed: so is the bracket around it
            at = string.end()
