"""GGUF models through llama-cpp-python (worker side only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import llama_cpp

from .backend import Backend, BadRequest, Completion
from .prompting import PromptBuilder


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
        self.prompts = PromptBuilder(self.llm)

    def info(self) -> dict[str, Any]:
        """See :meth:`Backend.info`."""
        return {"runtime": "llama.cpp", "llama_cpp_version": llama_cpp.__version__,
                "context": self.context, "threads": self.runtime["threads"],
                "embeddings": self.embeddings}

    def complete(
        self,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> Completion:
        """See :meth:`Backend.complete`."""
        if self.embeddings:
            raise BadRequest("this model serves embeddings only", code="unsupported")
        prompt = self.prompts.prompt(request)
        tokens, stop, extra = prompt.tokens, prompt.stop, prompt.stopping_criteria
        room = self.context - len(tokens)
        max_tokens = request.get("max_tokens") or room
        if room <= 0 or max_tokens > room:
            raise BadRequest(
                f"prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context window ({self.context} tokens)",
                code="context_length_exceeded",
            )
        grammar_text = self.prompts.grammar_text(request)
        grammar = (llama_cpp.LlamaGrammar.from_string(grammar_text, verbose=False)
                   if grammar_text is not None else None)
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
