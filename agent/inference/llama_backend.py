"""GGUF models through llama-cpp-python (worker side only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .backend import Backend, BadRequest, Completion
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


class _Counter:
    """Counts sampled tokens, learns the prompt length, and stops on cancel.

    llama.cpp calls a stopping criterion once per sampled token with the
    whole sequence so far, which makes it the one hook that both counts
    exactly and can end a generation between two tokens.
    """

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self.cancelled = cancelled
        self.sampled = 0
        self.prompt_tokens: int | None = None

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        return self.cancelled()


class LlamaBackend(Backend):
    """One ``llama_cpp.Llama``; one generation at a time (the worker is sequential)."""

    def __init__(self, model: str, runtime: dict[str, Any]) -> None:
        kwargs: dict[str, Any] = {
            "model_path": model,
            "n_ctx": runtime["context"],
            "n_threads": runtime["threads"],
            "n_threads_batch": runtime["threads"],
            "n_gpu_layers": runtime["gpu_layers"],
            "use_mmap": runtime["mmap"],
            "embedding": runtime["embeddings"],
            "seed": 0,
            "verbose": False,
        }
        if runtime.get("batch"):
            kwargs["n_batch"] = runtime["batch"]
        self.runtime = runtime
        self.embeddings = bool(runtime["embeddings"])
        self.llm = llama_cpp.Llama(**kwargs)
        self.context = self.llm.n_ctx()
        self._formatter = self._chat_formatter()

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        # Built the way Llama builds its own handler, so prompts render identically
        # to create_chat_completion; but we keep the formatter and call
        # create_completion ourselves, which (unlike create_chat_completion)
        # takes a stopping criterion: our cancel and token counter.
        llm = self.llm
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        template = llm.metadata.get("tokenizer.chat_template") or CHATML
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                   stop_token_ids=[eos_id])

    def info(self) -> dict[str, Any]:
        """See :meth:`Backend.info`."""
        return {"runtime": "llama.cpp", "llama_cpp_version": llama_cpp.__version__,
                "context": self.context, "threads": self.runtime["threads"],
                "embeddings": self.embeddings}

    def _prompt(self, request: dict[str, Any]) -> tuple[list[int], list[str], Any]:
        stop = list(request.get("stop") or [])
        extra = None
        if "messages" in request:
            rendered = self._formatter(messages=request["messages"])
            tokens = self.llm.tokenize(rendered.prompt.encode(),
                                       add_bos=not rendered.added_special, special=True)
            if rendered.stop is not None:
                stop += rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
            extra = rendered.stopping_criteria
        else:
            tokens = self.llm.tokenize(request["prompt"].encode(), add_bos=True, special=False)
        return tokens, stop, extra

    def grammar(self, response_format: dict[str, Any] | None) -> llama_cpp.LlamaGrammar | None:
        """The grammar that enforces ``response_format`` (None for free text).

        The GBNF is parsed once here against the model's vocabulary: the
        sampler llama-cpp-python builds from a grammar that fails to parse is
        a null pointer it would then use, so a bad grammar must never get there.
        """
        if not response_format:
            return None
        kind = response_format.get("type")
        try:
            if kind == "json_object":
                text = json_object_gbnf()
            elif kind == "json_schema":
                text = schema_to_gbnf(response_format.get("schema"))
            else:
                raise BadRequest(f"response_format type {kind!r} is not supported",
                                 code="unsupported_parameter")
        except UnsupportedSchema as exc:
            raise BadRequest(f"response_format.json_schema.schema: {exc}",
                             code=exc.code) from None
        if not grammar_parses(self.llm, text):
            raise BadRequest("the grammar built from response_format does not parse",
                             status=500, code="grammar_error")
        return llama_cpp.LlamaGrammar.from_string(text, verbose=False)

    def complete(
        self,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> Completion:
        """See :meth:`Backend.complete`."""
        if self.embeddings:
            raise BadRequest("this model serves embeddings only", code="unsupported")
        tokens, stop, extra = self._prompt(request)
        room = self.context - len(tokens)
        max_tokens = request.get("max_tokens") or room
        if room <= 0 or max_tokens > room:
            raise BadRequest(
                f"prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context window ({self.context} tokens)",
                code="context_length_exceeded",
            )
        grammar = self.grammar(request.get("response_format"))
        counter = _Counter(cancelled)
        criteria = [counter] + ([extra] if extra is not None else [])
        finish = "stop"
        stream = self.llm.create_completion(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=request.get("temperature", 1.0),
            top_p=request.get("top_p", 1.0),
            stop=stop,
            seed=request.get("seed"),
            frequency_penalty=request.get("frequency_penalty", 0.0),
            presence_penalty=request.get("presence_penalty", 0.0),
            grammar=grammar,
            stream=True,
            stopping_criteria=llama_cpp.StoppingCriteriaList(criteria),
        )
        for chunk in stream:
            choice = chunk["choices"][0]
            if choice["text"]:
                emit(choice["text"])
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        # llama-cpp-python calls the criteria once more after its loop, to learn why it
        # ended: that call sampled nothing. And the last sampled token of a "stop" (end
        # of text, a stop string) is not output.
        completion = max(counter.sampled - 1 - (1 if finish == "stop" else 0), 0)
        return Completion(finish, counter.prompt_tokens or len(tokens), completion)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """See :meth:`Backend.embed`."""
        if not self.embeddings:
            raise BadRequest("this model does not serve embeddings", code="unsupported")
        result = self.llm.create_embedding(texts)
        return [d["embedding"] for d in result["data"]], result["usage"]["prompt_tokens"]
