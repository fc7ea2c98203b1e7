"""An evaluation set and the speed figures, measured on a loaded model.

Each item is asked as the one user message of a chat, rendered through the
model's own chat template exactly as the agent renders requests
(:class:`agent.inference.prompting.PromptBuilder`), under the grammar of the
item's ``response_format`` where it has one (as the device sends it), and
answered greedily;
the answers are scored with the release's scorers
(:func:`protocol.score_answers`), so a build scores a variant the way a
device does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import EvalItem, EvalScore, EvalSet, score_answers

#: the prompt speed is measured with: short, answered at length by any chat model
SPEED_PROMPT = "Tell me a short story about a lighthouse keeper."
SPEED_TOKENS = 48


@dataclass(frozen=True, slots=True)
class Speed:
    """Time to first token and decode rate of one greedy streamed answer."""

    ttft_ms: float
    tokens_per_s: float


def load_chat_model(path: Path, n_ctx: int, threads: int):
    """``path`` loaded as the agent's worker loads it for chat (logits of the last token only)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def _prompt(llm, text: str):
    from agent.inference.prompting import PromptBuilder

    return PromptBuilder(llm).prompt({"messages": [{"role": "user", "content": text}]})


def answer(llm, prompt_text: str, max_tokens: int,
           response_format: dict[str, Any] | None = None) -> str:
    """The greedy answer of ``llm`` to one user message (constrained to ``response_format``).

    A format whose grammar the agent refuses (a schema feature it cannot
    enforce) gets an empty answer, which fails the item, as on a device.
    """
    import llama_cpp

    from agent.inference.backend import BadRequest
    from agent.inference.prompting import PromptBuilder

    request = {"messages": [{"role": "user", "content": prompt_text}],
               "response_format": response_format}
    builder = PromptBuilder(llm)
    prompt = builder.prompt(request)
    try:
        grammar_text = builder.grammar_text(request)
    except BadRequest:
        return ""
    grammar = (llama_cpp.LlamaGrammar.from_string(grammar_text, verbose=False)
               if grammar_text is not None else None)
    llm.reset()
    out = llm.create_completion(prompt.tokens, max_tokens=max_tokens, temperature=0.0,
                                stop=prompt.stop or None,
                                stopping_criteria=prompt.stopping_criteria, grammar=grammar)
    return out["choices"][0]["text"]


def _answer_item(llm, item: EvalItem) -> str:
    from agent.healthcheck.evaluation import worker_format

    return answer(llm, item.prompt, item.max_tokens, worker_format(item))


def run_eval_set(llm, items: EvalSet,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[EvalScore, dict[str, str], float]:
    """Score every item: (the score, each item's answer, seconds per item)."""
    answers: dict[str, str] = {}
    started = time.perf_counter()
    for done, item in enumerate(items.items, start=1):
        answers[item.id] = _answer_item(llm, item)
        if progress is not None:
            progress(done, len(items.items))
    per_item = (time.perf_counter() - started) / len(items.items)
    return score_answers(items, answers), answers, per_item


def answer_figures(score: EvalScore, answers: dict[str, str], per_item: float,
                   speed: Speed) -> dict[str, Any]:
    """The evaluation and speed figures of a measurement (:class:`.measure.Measurement`)."""
    return {"eval_score": score.score, "eval_by_category": score.as_dict()["by_category"],
            "eval_s_per_item": per_item, "answers": answers, "ttft_ms": speed.ttft_ms,
            "tokens_per_s": speed.tokens_per_s}


def measure_speed(llm) -> Speed:
    """TTFT and tokens/s of one streamed greedy answer, after one uncounted warm-up."""
    prompt = _prompt(llm, SPEED_PROMPT)
    for counted in (False, True):
        llm.reset()  # no prefix reuse: the prompt is processed every time
        started = time.perf_counter()
        first = None
        tokens = 0
        for _ in llm.create_completion(prompt.tokens, max_tokens=SPEED_TOKENS if counted else 4,
                                       temperature=0.0, stream=True):
            tokens += 1
            if first is None:
                first = time.perf_counter()
        ended = time.perf_counter()
    assert first is not None
    decode_s = ended - first
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0
    return Speed(ttft_ms=(first - started) * 1000, tokens_per_s=rate)
