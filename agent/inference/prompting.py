"""From a request to what llama.cpp runs: prompt tokens, stop strings, grammar (worker side).

Kept apart from the generation loop (:mod:`.llama_backend`): what a request
*means* (its chat template, its ``response_format``, its tools) is one
concern; how the tokens are decoded, one sequence or several at once, is
another.

Tools: a template that mentions ``tools`` is given them (and earlier calls
and results as OpenAI shapes them); any other template sees them as text
(:func:`.tool_calls.render_messages`). Either way the answer is sampled
under the envelope grammar of :mod:`.tool_calls`, so every model answers
calls in the one format the agent reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import tool_calls
from .backend import BadRequest
from .json_schema_grammar import UnsupportedSchema, json_object_gbnf, schema_to_gbnf

#: used when a GGUF carries no chat template (llama-cpp-python's own fallback is ChatML too)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def grammar_parses(llm: llama_cpp.Llama, text: str) -> bool:
    """Whether llama.cpp parses GBNF ``text`` (root rule ``root``) for ``llm``'s vocabulary."""
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, text.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@dataclass(slots=True)
class Prompt:
    """A request made ready for decoding."""

    tokens: list[int]
    #: strings that end the answer (the request's, then the template's)
    stop: list[str]
    #: the chat template's own stopping criterion (its end-of-turn tokens), if any
    stopping_criteria: Any = None


class PromptBuilder:
    """Renders requests for one loaded ``llama_cpp.Llama`` (its template and vocabulary)."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self.llm = llm
        self.template = llm.metadata.get("tokenizer.chat_template") or CHATML
        self.formatter = self._chat_formatter()
        #: whether the chat template renders ``tools`` (and so calls and results) itself
        self.template_has_tools = "tools" in self.template

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        # Built the way Llama builds its own handler, so prompts render identically
        # to create_chat_completion.
        llm = self.llm
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        return Jinja2ChatFormatter(template=self.template, eos_token=eos, bos_token=bos,
                                   stop_token_ids=[eos_id])

    def prompt(self, request: dict[str, Any]) -> Prompt:
        """The tokens a chat (``messages``) or text (``prompt``) request decodes from."""
        stop = list(request.get("stop") or [])
        if "messages" not in request:
            tokens = self.llm.tokenize(request["prompt"].encode(), add_bos=True, special=False)
            return Prompt(tokens, stop)
        rendered = self._render(request["messages"], tool_calls.ToolPlan.from_wire(
            request.get("tools")))
        tokens = self.llm.tokenize(rendered.prompt.encode(),
                                   add_bos=not rendered.added_special, special=True)
        if rendered.stop is not None:
            stop += rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return Prompt(tokens, stop, rendered.stopping_criteria)

    def _render(self, messages: list[dict[str, Any]], plan: tool_calls.ToolPlan | None) -> Any:
        """The chat template applied to ``messages`` (and the tools, where it shows them)."""
        if not self.template_has_tools:
            return self.formatter(messages=tool_calls.render_messages(messages, plan))
        if plan is None or not plan.calls_possible:
            return self.formatter(messages=messages)
        messages = list(messages)
        tool_calls.add_system_text(messages, tool_calls.instructions(plan, list_tools=False))
        tools = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in plan.tools]
        return self.formatter(messages=messages, tools=tools)

    def grammar_text(self, request: dict[str, Any]) -> str | None:
        """The GBNF (root rule ``root``) the answer must follow, or None for free text.

        Checked here against the model's vocabulary: a sampler llama.cpp
        builds from a grammar that fails to parse is a null pointer, so a bad
        grammar must never get as far as sampling.
        """
        text = self._grammar_source(request)
        if text is None:
            return None
        if not grammar_parses(self.llm, text):
            raise BadRequest("the grammar built from the request does not parse",
                             status=500, code="grammar_error")
        return text

    @staticmethod
    def _grammar_source(request: dict[str, Any]) -> str | None:
        """The GBNF of the request's tool envelope or ``response_format`` (None: free text)."""
        response_format = request.get("response_format")
        plan = tool_calls.ToolPlan.from_wire(request.get("tools"))
        if plan is not None and plan.calls_possible:
            if response_format:
                raise BadRequest("response_format with tools is supported with tool_choice "
                                 "\"none\" only", code="unsupported_parameter")
            try:
                return tool_calls.envelope_gbnf(plan)
            except UnsupportedSchema as exc:
                raise BadRequest(f"tools: {exc}", code=exc.code) from None
        if not response_format:
            return None
        kind = response_format.get("type")
        try:
            if kind == "json_object":
                return json_object_gbnf()
            if kind == "json_schema":
                return schema_to_gbnf(response_format.get("schema"))
        except UnsupportedSchema as exc:
            raise BadRequest(f"response_format.json_schema.schema: {exc}",
                             code=exc.code) from None
        raise BadRequest(f"response_format type {kind!r} is not supported",
                         code="unsupported_parameter")
