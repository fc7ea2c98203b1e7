"""Reading a tool-call envelope as it streams: content text, call names, argument fragments.

The envelope (:mod:`.tool_calls` builds its grammar and prompt) is one of::

    {"tool_calls":[{"name":"<tool>","arguments":{...}},...]}
    {"response":"<text>"}

Its formatting is fixed by the grammar, blanks only where a JSON value
may end, so a character-at-a-time state machine reads it: the content of
``response`` decoded as whole escapes arrive, each call's name once it
closes, its ``arguments`` as raw JSON text in fragments. Stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tool_calls import ToolPlan

#: how an envelope of calls begins, and one of text (the grammar spells them exactly so)
CALLS_HEAD, RESPONSE_HEAD = '{"tool_calls":[', '{"response":'
#: how each call begins, and its arguments
CALL_HEAD, ARGS_HEAD = '{"name":"', ',"arguments":'


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
            if self._pending == CALLS_HEAD:
                self._pending = ""
                self._literal(CALL_HEAD, "name")
            elif self._pending == RESPONSE_HEAD + '"':
                self._pending = ""
                self._state = "string"
            elif not (CALLS_HEAD.startswith(self._pending)
                      or (RESPONSE_HEAD + '"').startswith(self._pending)):
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
                self._literal(ARGS_HEAD, "arguments")
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
            self._literal(CALL_HEAD, "name")
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
