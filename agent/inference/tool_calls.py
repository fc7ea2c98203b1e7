"""Tool calls through a JSON envelope: what the model sees, what it may answer, how it is read.

Many small models' chat templates cannot show tools (SmolLM2's is plain
ChatML). For those the tools are described in the system message, earlier
calls and their results are written into the conversation as text, and the
answer is sampled under a grammar that admits only the envelope of
llama.cpp's "generic" tool format, with each call's ``arguments`` built from
that tool's ``parameters`` schema::

    {"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}
    {"response":"It is sunny."}          (tool_choice "auto" only)

The envelope's own formatting is fixed by the grammar (no blanks between
its keys), so :class:`EnvelopeReader` (:mod:`.tool_reader`, re-exported
here) is a small state machine that turns the text as it streams into
content text and call events; every front end of the local API reads
answers through it.

Stdlib only: the agent process imports this to check tools and read
answers; the worker builds the prompt and the grammar with it. The schema
converter is imported only by requests that carry tools, as for
``response_format``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .tool_reader import (
    ARGS_HEAD,
    CALL_HEAD,
    CALLS_HEAD,
    RESPONSE_HEAD,
    ArgumentsPiece,
    Call,
    CallStarted,
    EnvelopeReader,
    Event,
    Reply,
    TextPiece,
    read_reply,
)

__all__ = [
    "MAX_CALLS", "MAX_TOOLS", "ArgumentsPiece", "Call", "CallStarted", "EnvelopeReader",
    "Event", "Reply", "TextPiece", "Tool", "ToolError", "ToolPlan", "add_system_text",
    "envelope_gbnf", "instructions", "parse_openai", "read_reply", "render_messages",
]

#: most tools in one request
MAX_TOOLS = 64
#: most calls in one answer (parallel_tool_calls): bounds a model that repeats itself
MAX_CALLS = 8
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CHOICES = ("auto", "none", "required")
#: a function without ``parameters`` takes none (OpenAI's reading)
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}


class ToolError(ValueError):
    """Tools or a tool choice the request cannot have; ``param`` names the field."""

    def __init__(self, message: str, param: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True, slots=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools of one request and how the answer may use them.

    ``choice`` is ``auto`` (a call or text), ``required`` (one call or more),
    ``function`` (a call of ``name`` alone) or ``none`` (text; the tools are
    not shown).
    """

    tools: tuple[Tool, ...]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def calls_possible(self) -> bool:
        """Whether the answer is an envelope (it may or must hold calls)."""
        return self.choice != "none"

    def callable(self) -> tuple[Tool, ...]:
        """The tools the answer may call."""
        return tuple(t for t in self.tools if self.name is None or t.name == self.name)

    def wire(self) -> dict[str, Any]:
        """A JSON-ready form, as the agent hands it to the worker."""
        return {"tools": [{"name": t.name, "description": t.description,
                           "parameters": t.parameters} for t in self.tools],
                "choice": self.choice, "name": self.name, "parallel": self.parallel}

    @classmethod
    def from_wire(cls, data: dict[str, Any] | None) -> ToolPlan | None:
        """The plan :meth:`wire` wrote (None: the request has no tools)."""
        if not data:
            return None
        return cls(tuple(Tool(t["name"], t["description"], t["parameters"])
                         for t in data["tools"]),
                   data["choice"], data.get("name"), data["parallel"])


# -- checking OpenAI's fields ---------------------------------------------------------------

def _tool(item: Any, i: int) -> Tool:
    where = f"'tools' item {i}"
    if not isinstance(item, dict) or item.get("type") != "function":
        kind = item.get("type") if isinstance(item, dict) else None
        raise ToolError(f"{where}: type {kind!r} is not supported; only 'function' tools",
                        "tools", "unsupported_parameter")
    fn = item.get("function")
    if not isinstance(fn, dict):
        raise ToolError(f"{where}: 'function' must be an object", "tools")
    extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if extra:
        raise ToolError(f"{where}: 'function.{extra[0]}' is not supported", "tools",
                        "unsupported_parameter")
    name = fn.get("name")
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise ToolError(f"{where}: 'function.name' must be 1 to 64 letters, digits, '_' or "
                        "'-'", "tools")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ToolError(f"{where}: 'function.description' must be a string", "tools")
    if not isinstance(fn.get("strict", False), bool | None):
        raise ToolError(f"{where}: 'function.strict' must be true or false", "tools")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = NO_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get(
            "type", "object" if "properties" in parameters else None) != "object":
        raise ToolError(f"{where}: 'function.parameters' must be a JSON Schema with "
                        "\"type\": \"object\"", "tools")
    from .json_schema_grammar import UnsupportedSchema, schema_rules

    try:
        schema_rules(parameters, "t")  # a dry run: refuse what the grammar cannot enforce
    except UnsupportedSchema as exc:
        raise ToolError(f"{where} ({name}): function.parameters: {exc}", "tools",
                        exc.code) from None
    except RecursionError:
        raise ToolError(f"{where} ({name}): function.parameters nests too deep", "tools",
                        "unsupported_schema") from None
    return Tool(name, description, parameters)


def parse_openai(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolPlan | None:
    """The plan of OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

    None when the request has no tools; raises :class:`ToolError` naming
    the field for anything malformed, so nothing is dropped silently.
    """
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
    parsed = tuple(_tool(item, i) for i, item in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ToolError("'tools' names a function twice", "tools")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tool_choice is None or tool_choice in CHOICES:
        return ToolPlan(parsed, tool_choice or "auto", None, parallel)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise ToolError("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                        "tool_choice")
    if fn["name"] not in names:
        raise ToolError(f"'tool_choice' names {fn['name']!r}, which is not in 'tools'",
                        "tool_choice")
    return ToolPlan(parsed, "function", fn["name"], parallel)


# -- what the model sees and may answer -------------------------------------------------------

def envelope_gbnf(plan: ToolPlan) -> str:
    """The GBNF (root rule ``root``) of the answers ``plan`` admits.

    Each tool's arguments rules are named after its position (``tool0-...``)
    so that the tools' schemas share one grammar. Raises the converter's
    ``UnsupportedSchema`` for what the grammar cannot enforce.
    """
    from .json_schema_grammar import literal, schema_rules

    rules: dict[str, str] = {}
    alternatives = []
    for i, tool in enumerate(plan.tools):
        if tool not in plan.callable():
            continue
        top, own = schema_rules(tool.parameters, f"tool{i}")
        rules.update(own)
        head = literal(f'{CALL_HEAD}{tool.name}"{ARGS_HEAD}')
        rules[f"call{i}"] = f'{head} {top} "}}"'
        alternatives.append(f"call{i}")
    rules["call"] = " | ".join(alternatives)
    more = f' ("," call){{0,{MAX_CALLS - 1}}}' if plan.parallel else ""
    rules["calls"] = f'{literal(CALLS_HEAD)} call{more} "]}}"'
    root = "calls"
    if plan.choice == "auto":
        text, own = schema_rules({"type": "string"}, "response")
        rules.update(own)
        rules["response"] = f'{literal(RESPONSE_HEAD)} {text} "}}"'
        root = "calls | response"
    order = ["root", *sorted(rules)]
    rules["root"] = root
    return "\n".join(f"{k} ::= {rules[k]}" for k in order) + "\n"


def instructions(plan: ToolPlan, *, list_tools: bool) -> str:
    """System-message text that tells the model the tools (``list_tools``) and the envelope."""
    lines = []
    if list_tools:
        lines.append("You can call these tools (name, description, JSON Schema of the "
                     "arguments):")
        lines += [json.dumps({"name": t.name, "description": t.description,
                              "parameters": t.parameters}, ensure_ascii=False)
                  for t in plan.tools]
        lines.append("")
    lines.append('To call tools, answer with JSON only: {"tool_calls":[{"name":"<tool name>",'
                 '"arguments":{<arguments>}}]}')
    if plan.choice == "auto":
        lines.append('To answer without a tool, answer {"response":"<your answer>"}.')
    elif plan.choice == "function":
        lines.append(f"Call the tool {plan.name}.")
    else:
        lines.append("Call a tool.")
    if not plan.parallel:
        lines.append("Call exactly one tool.")
    return "\n".join(lines)


def _arguments_value(arguments: Any) -> Any:
    """Arguments as JSON (OpenAI sends JSON text, Ollama an object); text that is not
    JSON stays text."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def render_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """``messages`` for a chat template without tool support: text turns only.

    The tools and the envelope go into the system message (when calls are
    possible), earlier assistant ``tool_calls`` become the envelope the model
    would have written, and ``role: "tool"`` results become one user turn per
    run of results (templates that insist on alternating roles accept it).
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                fn = call["function"]
                names[call["id"]] = fn["name"]
                calls.append({"name": fn["name"], "arguments": _arguments_value(fn["arguments"])})
            envelope = json.dumps({"tool_calls": calls}, ensure_ascii=False,
                                  separators=(",", ":"))
            out.append({"role": "assistant",
                        "content": f"{content}\n{envelope}" if content else envelope})
        elif role == "tool":
            result = json.dumps({"tool_response": {
                "name": names.get(message["tool_call_id"], ""),
                "tool_call_id": message["tool_call_id"], "content": content}},
                ensure_ascii=False)
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for message in out:
        message.pop("tool_results", None)
    if plan is not None and plan.calls_possible:
        add_system_text(out, instructions(plan, list_tools=True))
    return out


def add_system_text(messages: list[dict[str, Any]], text: str) -> None:
    """Append ``text`` to the leading system message, or put one first."""
    if messages and messages[0]["role"] in ("system", "developer") \
            and isinstance(messages[0].get("content"), str):
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
    else:
        messages.insert(0, {"role": "system", "content": text})
