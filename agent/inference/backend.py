"""The inference backend interface, as the worker subprocess sees it.

One :class:`Backend` per loaded model, inside the worker only: the agent
process never imports llama.cpp or onnxruntime (its idle RSS budget is a
few MB, and a native crash must take the worker, not the agent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the file that makes a model folder an onnxruntime-genai model
GENAI_CONFIG = "genai_config.json"


class BadRequest(Exception):
    """The request cannot run on this model; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Completion:
    """How a generation ended; the text itself went out through ``emit``."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Backend(ABC):
    """A loaded model."""

    #: serves /v1/embeddings rather than completions
    embeddings: bool = False
    #: generations that decode at once through :meth:`submit`; 0: only :meth:`complete`,
    #: one at a time
    slots: int = 0

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What was loaded and how (runtime, providers, fallbacks), for the agent's log."""

    def complete(
        self,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> Completion:
        """Generate for a chat (``messages``) or text (``prompt``) request.

        Each piece of text goes to ``emit`` as soon as it is decoded;
        generation stops early once ``cancelled()`` is true.
        """
        raise BadRequest("this model does not generate text", code="unsupported")

    def submit(
        self,
        request: dict[str, Any],
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
        finished: Callable[[Completion | BaseException], None],
    ) -> None:
        """Start a generation beside the running ones and return at once (``slots`` > 0).

        Refusals (:class:`BadRequest`) are raised here; text goes to ``emit``
        and the end to ``finished``, both from the decoding thread.
        """
        raise BadRequest("this model does not generate text", code="unsupported")

    def load_adapter(self, name: str, path: str, scale: float) -> dict[str, Any]:
        """Load a LoRA adapter under ``name`` for requests that name it (llama.cpp only)."""
        raise BadRequest("this model takes no adapters", code="unsupported")

    def drop_adapter(self, name: str) -> dict[str, Any]:
        """Free adapter ``name`` once no request decodes with it."""
        raise BadRequest("this model takes no adapters", code="unsupported")

    def close(self) -> None:
        """Stop what runs and free the model's threads (the worker is exiting)."""
        return None

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text, and the number of tokens read."""
        raise BadRequest("this model does not serve embeddings", code="unsupported")

    def infer(self, inputs: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        """Run the graph on named inputs; return the named outputs (ONNX only)."""
        raise BadRequest("this model has no generic inference path", code="unsupported")


def load_backend(model: str, fmt: str, runtime: dict[str, Any]) -> Backend:
    """Load ``model`` with the runtime its format needs (imported only here)."""
    if fmt == "gguf":
        from .llama_backend import LlamaBackend

        return LlamaBackend(model, runtime)
    if fmt == "onnx":
        # A folder with a genai_config.json is a generative model
        # (onnxruntime-genai); a single file is a graph for onnxruntime.
        if (Path(model) / GENAI_CONFIG).is_file():
            from .genai_backend import GenaiBackend

            return GenaiBackend(model, runtime)
        from .onnx_backend import OnnxBackend

        return OnnxBackend(model, runtime)
    raise ValueError(f"unknown model format {fmt!r}")
