"""Every figure the build judges a variant by, measured on this machine.

Perplexity on the held-out text (:mod:`.perplexity`), the evaluation set
and speed (:mod:`.evaluate`; an ONNX folder's through :mod:`.onnx`), file
size, the RAM it costs at each tier's context (:mod:`.rss`), and the types
its tensors hold (:mod:`.tensors`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol import EvalSet

from .evaluate import answer_figures, load_chat_model, measure_speed, run_eval_set
from .onnx import measure_folder
from .perplexity import load_scoring_model, perplexity
from .rss import model_ram
from .spec import BuildSpec
from .tensors import read_tensors, type_counts

#: the chat context the evaluation set runs in (prompt plus at most 512 answer tokens)
EVAL_CONTEXT = 1024


@dataclass
class Measurement:
    """One variant's figures (JSON round-trip through :meth:`as_dict` / :meth:`from_dict`)."""

    perplexity: float
    eval_score: float
    eval_by_category: dict[str, Any]
    eval_s_per_item: float
    ttft_ms: float
    tokens_per_s: float
    size_bytes: int
    #: resident bytes the model costs at each tier context, keyed by the context as a string
    ram_bytes: dict[str, int]
    #: resident bytes of the runtime (Python and llama.cpp) before any model is loaded
    runtime_base_bytes: int
    #: how many tensors hold each type
    tensor_types: dict[str, int]
    #: answers per eval item, for reading why a score dropped
    answers: dict[str, str] = field(default_factory=dict)

    def ram_at(self, context: int) -> int:
        """RAM serving the variant at ``context`` needs: the runtime's base and the model."""
        return self.runtime_base_bytes + self.ram_bytes[str(context)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of :meth:`as_dict`."""
        return cls(**data)


#: progress callback: (step name, done, total)
Progress = Callable[[str, int, int], None]


def measure(path: Path, spec: BuildSpec, text: str, items: EvalSet,
            progress: Progress | None = None) -> Measurement:
    """Measure the GGUF file, or the ONNX folder, at ``path`` with the settings of ``spec``."""
    def step(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    if path.is_dir():
        figures = measure_folder(path, spec, text, items, step, EVAL_CONTEXT)
    else:
        figures = _measure_gguf(path, spec, text, items, step)
    ram, bases = {}, []
    contexts = spec.contexts()
    for done, context in enumerate(contexts, start=1):
        cost = model_ram(path, context, spec.threads)
        ram[str(context)] = cost.model_bytes
        bases.append(cost.base_bytes)
        if progress is not None:
            progress("RAM", done, len(contexts))
    return Measurement(ram_bytes=ram, runtime_base_bytes=max(bases), **figures)


def _measure_gguf(path: Path, spec: BuildSpec, text: str, items: EvalSet,
                  step: Callable[[str], Callable[[int, int], None] | None]) -> dict[str, Any]:
    threads = spec.threads
    scorer = load_scoring_model(path, spec.held_out.context, threads)
    try:
        ppl = perplexity(scorer, text, spec.held_out.context, max_chunks=spec.held_out.chunks,
                         progress=step("perplexity"))
    finally:
        scorer.close()
    chat = load_chat_model(path, EVAL_CONTEXT, threads)
    try:
        score, answers, per_item = run_eval_set(chat, items, progress=step("eval set"))
        speed = measure_speed(chat)
    finally:
        chat.close()
    return {**answer_figures(score, answers, per_item, speed), "perplexity": ppl.perplexity,
            "size_bytes": path.stat().st_size, "tensor_types": type_counts(read_tensors(path))}
