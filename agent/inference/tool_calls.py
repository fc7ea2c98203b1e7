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
its keys), so :class:`EnvelopeReader` is a small state machine that turns
the text as it streams into content text and call events; every front end
of the local API (OpenAI, Ollama) reads answers through it.

Stdlib only: the agent process imports this to check tools and read
answers; the worker builds the prompt and the grammar with it. The schema
converter is imported only by requests that carry tools, as for
``response_format``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

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

_CALLS_HEAD = '{"tool_calls":['
_RESPONSE_HEAD = '{"response":'
_CALL_HEAD = '{"name":"'
_ARGS_HEAD = ',"arguments":'


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
        head = literal(f'{_CALL_HEAD}{tool.name}"{_ARGS_HEAD}')
        rules[f"call{i}"] = f'{head} {top} "}}"'
        alternatives.append(f"call{i}")
    rules["call"] = " | ".join(alternatives)
    more = f' ("," call){{0,{MAX_CALLS - 1}}}' if plan.parallel else ""
    rules["calls"] = f'{literal(_CALLS_HEAD)} call{more} "]}}"'
    root = "calls"
    if plan.choice == "auto":
        text, own = schema_rules({"type": "string"}, "response")
        rules.update(own)
        rules["response"] = f'{literal(_RESPONSE_HEAD)} {text} "}}"'
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


# -- reading the answer --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TextPiece:
    """Content text of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStarted:
    """Call number ``index`` names ``name``; its arguments follow."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsPiece:
    """More of the JSON text of call ``index``'s arguments."""

    index: int
    text: str


Event = TextPiece | CallStarted | ArgumentsPiece


@dataclass(slots=True)
class Call:
    """A tool call as read: ``arguments`` is JSON text (complete once the envelope is)."""

    name: str
    arguments: str = ""


@dataclass(slots=True)
class Reply:
    """What an answer said: content text (None for calls alone) and calls.

    ``complete`` is False when the text ended inside the envelope (cut by
    ``max_tokens`` or a stop string): the last call's arguments may be cut too.
    """

    content: str | None
    calls: list[Call] = field(default_factory=list)
    complete: bool = True


class EnvelopeReader:
    """Feed the answer's text as it streams; get events; :meth:`finish` gives the reply.

    Without a plan that admits calls the text passes through as content.
    Text that is not an envelope (which the grammar rules out) is passed
    through as content from where it stops being one, so nothing is lost.
    """

    def __init__(self, plan: ToolPlan | None) -> None:
        self._state = "plain" if plan is None or not plan.calls_possible else "head"
        self._pending = ""  # the head read so far, or an escape sequence being read
        self._expect, self._then = "", ""
        self._depth, self._in_string, self._escaped = 0, False, False
        self._content: list[str] = []
        self.calls: list[Call] = []
        self._events: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of the answer's text."""
        for ch in text:
            self._step(ch)
        events, self._events = self._events, []
        return events

    def finish(self) -> Reply:
        """The reply, once all the text was fed."""
        if self._state == "head" and self._pending:
            self._text(self._pending)  # too short to be an envelope: it is text
        complete = self._state in ("plain", "done", "broken")
        content = "".join(self._content)
        if self._state == "plain" or content or not self.calls:
            return Reply(content, self.calls, complete)
        return Reply(None, self.calls, complete)

    # -- the state machine -----------------------------------------------------------------

    def _text(self, text: str) -> None:
        self._content.append(text)
        if self._events and isinstance(self._events[-1], TextPiece):
            self._events[-1] = TextPiece(self._events[-1].text + text)
        else:
            self._events.append(TextPiece(text))

    def _arguments(self, text: str) -> None:
        index = len(self.calls) - 1
        self.calls[index].arguments += text
        last = self._events[-1] if self._events else None
        if isinstance(last, ArgumentsPiece) and last.index == index:
            self._events[-1] = ArgumentsPiece(index, last.text + text)
        else:
            self._events.append(ArgumentsPiece(index, text))

    def _literal(self, text: str, then: str) -> None:
        self._state, self._expect, self._then = "literal", text, then

    def _break(self, text: str) -> None:
        self._state = "broken"
        self._text(text)

    def _step(self, ch: str) -> None:
        state = self._state
        if state in ("plain", "broken"):
            self._text(ch)
        elif state == "head":
            self._pending += ch
            if self._pending == _CALLS_HEAD:
                self._pending = ""
                self._literal(_CALL_HEAD, "name")
            elif self._pending == _RESPONSE_HEAD + '"':
                self._pending = ""
                self._state = "string"
            elif not (_CALLS_HEAD.startswith(self._pending)
                      or (_RESPONSE_HEAD + '"').startswith(self._pending)):
                pending, self._pending = self._pending, ""
                self._break(pending)
        elif state == "literal":
            if ch != self._expect[0]:
                self._break(ch)
            elif len(self._expect) > 1:
                self._expect = self._expect[1:]
            else:
                self._state = self._then
        elif state == "name":
            if ch == '"':
                self.calls.append(Call(self._pending))
                self._events.append(CallStarted(len(self.calls) - 1, self._pending))
                self._pending = ""
                self._literal(_ARGS_HEAD, "arguments")
            else:
                self._pending += ch
        elif state == "arguments":
            self._argument_char(ch)
        elif state == "string":
            self._string_char(ch)
        elif ch in " \t\n":
            pass  # the bounded blanks the grammar allows after a JSON value
        elif state == "after_arguments" and ch == "}":
            self._state = "between"
        elif state == "between" and ch == ",":
            self._literal(_CALL_HEAD, "name")
        elif state == "between" and ch == "]":
            self._literal("}", "done")
        elif state == "after_response" and ch == "}":
            self._state = "done"
        elif state != "done":
            self._break(ch)

    def _argument_char(self, ch: str) -> None:
        self._arguments(ch)
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._state = "after_arguments"

    def _string_char(self, ch: str) -> None:
        """One character of the ``response`` string, decoded as whole escapes arrive."""
        if not self._pending:
            if ch == "\\":
                self._pending = ch
            elif ch == '"':
                self._state = "after_response"
            else:
                self._text(ch)
            return
        esc = self._pending + ch
        whole = ((len(esc) == 2 and ch != "u") or len(esc) == 12
                 or (len(esc) == 6 and not 0xD800 <= int(esc[2:6], 16) <= 0xDBFF))
        if whole:
            self._pending = ""
            self._text(json.loads(f'"{esc}"'))
        elif len(esc) in (7, 8) and esc[6:] != "\\u"[: len(esc) - 6]:
            # a high surrogate not followed by a low one: decode it alone, read on
            self._pending = ""
            self._text(json.loads(f'"{esc[:6]}"'))
            for rest in esc[6:]:
                self._string_char(rest)
        else:
            self._pending = esc


def read_reply(plan: ToolPlan | None, text: str) -> Reply:
    """The reply in a whole answer's text (for answers not streamed)."""
    reader = EnvelopeReader(plan)
    reader.feed(text)
    return reader.finish()
