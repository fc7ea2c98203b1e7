"""GGUF models through llama-cpp-python (worker side only)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import llama_cpp
from llama_cpp import _internals

from .backend import Backend, BadRequest, Completion
from .batch_decoder import BatchDecoder, Job
from .lora import AdapterSet
from .prompting import PromptBuilder
from .sampling import TokenSampler


def _slotted_context(llm: llama_cpp.Llama, parallel: int) -> None:
    """Give ``llm`` a context of ``parallel`` sequences, each with ``n_ctx / parallel`` cells.

    ``Llama`` always builds a one-sequence context; the KV cache is split
    among sequences only when the context is made that way (not unified:
    each sequence keeps its own share, and attention runs over that share
    alone instead of over every sequence's cells).
    """
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max = parallel
    params.kv_unified = False
    llm._ctx.close()
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    llm.context_params = params


class LlamaBackend(Backend):
    """One ``llama_cpp.Llama``; ``runtime["parallel"]`` generations decode at once."""

    def __init__(self, model: str, runtime: dict[str, Any]) -> None:
        self.parallel = max(int(runtime.get("parallel") or 1), 1)
        self.embeddings = bool(runtime["embeddings"])
        slots = 1 if self.embeddings else self.parallel
        kwargs: dict[str, Any] = {
            "model_path": model,
            # Each sequence gets the runtime context: the KV cache holds them all.
            "n_ctx": runtime["context"] * slots,
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
        self.llm = llama_cpp.Llama(**kwargs)
        if slots > 1:
            _slotted_context(self.llm, slots)
        self.context = runtime["context"]
        self.prompts = PromptBuilder(self.llm)
        self.decoder: BatchDecoder | None = None
        self.adapters: AdapterSet | None = None
        if not self.embeddings:
            self.slots = slots
            self.adapters = AdapterSet(self.llm._model.model, self.llm._ctx.ctx)
            self.decoder = BatchDecoder(self.llm._ctx.ctx, self.llm._model.vocab, slots,
                                        self.llm.n_batch, self.adapters)

    def info(self) -> dict[str, Any]:
        """See :meth:`Backend.info`."""
        return {"runtime": "llama.cpp", "llama_cpp_version": llama_cpp.__version__,
                "context": self.context, "threads": self.runtime["threads"],
                "embeddings": self.embeddings, "parallel": max(self.slots, 1)}

    def submit(
        self,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
        finished: Callable[[Completion | BaseException], None],
    ) -> None:
        """See :meth:`Backend.submit`."""
        if self.decoder is None:
            raise BadRequest("this model serves embeddings only", code="unsupported")
        adapter = request.get("adapter")
        if adapter is not None and (self.adapters is None or not self.adapters.has(adapter)):
            raise BadRequest(f"adapter {adapter!r} is not loaded", status=404,
                             code="model_not_found")
        prompt = self.prompts.prompt(request)
        tokens = prompt.tokens
        room = self.context - len(tokens)
        max_tokens = request.get("max_tokens") or room
        if room <= 0 or max_tokens > room:
            raise BadRequest(
                f"prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context window ({self.context} tokens)",
                code="context_length_exceeded",
            )
        sampler = TokenSampler(self.llm._model.vocab, self.llm.n_vocab(), request,
                               self.prompts.grammar_text(request))
        self.decoder.submit(Job(tokens, prompt.stop, prompt.stopping_criteria, max_tokens,
                                sampler, emit, cancelled, finished, adapter))

    def load_adapter(self, name: str, path: str, scale: float) -> dict[str, Any]:
        """See :meth:`Backend.load_adapter`."""
        if self.adapters is None:
            raise BadRequest("this model takes no adapters", code="unsupported")
        return {"load_ms": round(self.adapters.load(name, path, scale), 3),
                "adapters": self.adapters.names()}

    def drop_adapter(self, name: str) -> dict[str, Any]:
        """See :meth:`Backend.drop_adapter`."""
        if self.adapters is None or self.decoder is None:
            raise BadRequest("this model takes no adapters", code="unsupported")
        adapters = self.adapters
        dropped = threading.Event()

        def drop() -> None:
            try:
                adapters.drop(name)
            finally:
                dropped.set()

        self.decoder.between_turns(drop)
        dropped.wait()
        return {"adapters": adapters.names()}

    def complete(
        self,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> Completion:
        """See :meth:`Backend.complete` (one generation among the others, waited for)."""
        ended = threading.Event()
        outcome: list[Completion | BaseException] = []

        def finished(result: Completion | BaseException) -> None:
            outcome.append(result)
            ended.set()

        self.submit(request, emit, cancelled, finished)
        ended.wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """See :meth:`Backend.embed`."""
        if not self.embeddings:
            raise BadRequest("this model does not serve embeddings", code="unsupported")
        result = self.llm.create_embedding(texts)
        return [d["embedding"] for d in result["data"]], result["usage"]["prompt_tokens"]

    def close(self) -> None:
        """See :meth:`Backend.close`."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        if self.adapters is not None:
            self.adapters.close()
