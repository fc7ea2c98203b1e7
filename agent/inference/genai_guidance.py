"""What an onnxruntime-genai answer must follow, as a JSON schema for its guided decoding.

onnxruntime-genai ships llguidance, which takes a JSON schema: a
``response_format`` schema as it is (``json_object``: any object), and the
tool envelope of :mod:`.tool_calls` written as a schema, so that a call is
read by the same :class:`~.tool_calls.EnvelopeReader` whichever runtime
answered. The JSON is compact (no blank between tokens, as the envelope's
heads expect and so that a small model cannot loop on blanks), and the
properties come in the order declared (``name`` before ``arguments``).

Stdlib only, like :mod:`.tool_calls`; the worker's backend hands the result
to ``GeneratorParams.set_guidance("json_schema", ...)``.
"""

from __future__ import annotations

import json
from typing import Any

from . import tool_calls
from .backend import BadRequest

#: llguidance's JSON options: compact JSON, as ``json.dumps(..., separators=(",", ":"))``
OPTIONS = {"whitespace_flexible": False}


def _closed(properties: dict[str, Any]) -> dict[str, Any]:
    """An object with exactly ``properties``, all required, in that order."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def envelope_schema(plan: tool_calls.ToolPlan) -> dict[str, Any]:
    """The tool envelope ``plan`` admits as a JSON schema (:func:`.tool_calls.envelope_gbnf`)."""
    calls = [_closed({"name": {"const": t.name}, "arguments": t.parameters})
             for t in plan.callable()]
    envelope = _closed({"tool_calls": {
        "type": "array", "items": {"anyOf": calls}, "minItems": 1,
        "maxItems": tool_calls.MAX_CALLS if plan.parallel else 1}})
    if plan.choice != "auto":
        return envelope
    return {"anyOf": [envelope, _closed({"response": {"type": "string"}})]}


def guidance_schema(request: dict[str, Any]) -> str | None:
    """The JSON schema (text) the answer to ``request`` must follow, or None for free text."""
    plan = tool_calls.ToolPlan.from_wire(request.get("tools"))
    response_format = request.get("response_format")
    if plan is not None and plan.calls_possible:
        if response_format:
            raise BadRequest("response_format with tools is supported with tool_choice "
                             "\"none\" only", code="unsupported_parameter")
        schema = envelope_schema(plan)
    elif not response_format:
        return None
    elif response_format.get("type") == "json_object":
        schema = {"type": "object"}
    elif response_format.get("type") == "json_schema":
        schema = dict(response_format["schema"])
    else:
        raise BadRequest(f"response_format type {response_format.get('type')!r} is not "
                         "supported", code="unsupported_parameter")
    return json.dumps({**schema, "x-guidance": OPTIONS})
