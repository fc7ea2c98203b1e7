"""ONNX candidates: an onnxruntime-genai folder measured with the figures a GGUF gets.

The build does not make ONNX models (scripts/build-onnx-genai.sh does); it
judges one it is given beside the quantizations, loaded through the agent's
own onnxruntime-genai backend (:class:`agent.inference.genai_backend.GenaiBackend`)
on the CPU, so its answers are the ones a device's worker gives:

* the evaluation set: each item as one user message through the folder's
  chat template, greedy;
* TTFT and tokens/s of one streamed greedy answer, after a warm-up;
* perplexity on the held-out text, as :mod:`.perplexity` computes it, from
  onnxruntime-genai's logits: each chunk's first half appended at once, then
  one token at a time, the logits after each scoring the next token (the
  folder's own tokenizer, which adds no BOS for SmolLM2);
* size: every file of the folder; RAM in a fresh process (:mod:`.rss`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from protocol import EvalSet, score_answers

from .evaluate import SPEED_PROMPT, SPEED_TOKENS, Speed, answer_figures
from .perplexity import PerplexityResult, chunk_count, negative_log_likelihood


def folder_files(folder: Path) -> list[Path]:
    """The folder's files, sorted (hidden names skipped, as publishing refuses them)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in
                                             p.relative_to(folder).parts))


def folder_size(folder: Path) -> int:
    """Bytes of every file in the folder."""
    return sum(p.stat().st_size for p in folder_files(folder))


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and content: the folder's identity."""
    digest = hashlib.sha256()
    for path in folder_files(folder):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def load_backend(folder: Path, context: int, threads: int):
    """The folder loaded as the agent's worker loads it, on the CPU."""
    from agent.inference.genai_backend import GenaiBackend

    return GenaiBackend(str(folder), {"threads": threads, "context": context,
                                      "onnx_providers": ["CPUExecutionProvider"]})


def _ask(backend, prompt: str, max_tokens: int,
         on_piece: Callable[[str], None] | None = None) -> tuple[str, int]:
    """The greedy answer to one user message, and how many tokens it took."""
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)

    done = backend.complete({"messages": [{"role": "user", "content": prompt}],
                             "max_tokens": max_tokens, "temperature": 0.0},
                            emit, lambda: False)
    return "".join(pieces), done.completion_tokens


def run_eval_set(backend, items: EvalSet, progress: Callable[[int, int], None] | None = None):
    """Score every item: (the score, each item's answer, seconds per item)."""
    answers: dict[str, str] = {}
    started = time.perf_counter()
    for done, item in enumerate(items.items, start=1):
        answers[item.id], _ = _ask(backend, item.prompt, item.max_tokens)
        if progress is not None:
            progress(done, len(items.items))
    per_item = (time.perf_counter() - started) / len(items.items)
    return score_answers(items, answers), answers, per_item


def measure_speed(backend) -> Speed:
    """TTFT and tokens/s of one streamed greedy answer, after an uncounted warm-up."""
    _ask(backend, SPEED_PROMPT, 4)
    firsts: list[float] = []
    started = time.perf_counter()
    _, tokens = _ask(backend, SPEED_PROMPT, SPEED_TOKENS,
                     on_piece=lambda _: firsts.append(time.perf_counter()))
    ended = time.perf_counter()
    if not firsts:
        raise RuntimeError("the ONNX model answered nothing to the speed prompt")
    decode_s = ended - firsts[0]
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else 0.0
    return Speed(ttft_ms=(firsts[0] - started) * 1000, tokens_per_s=rate)


def perplexity(backend, text: str, n_ctx: int, *, max_chunks: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of the loaded folder on ``text`` (see the module docstring)."""
    import onnxruntime_genai as og

    if text.endswith("\n"):
        text = text[:-1]
    tokens = [int(t) for t in backend.tokenizer.encode(text)]
    chunks = chunk_count(len(tokens), n_ctx, max_chunks)
    first = n_ctx // 2
    total, count = 0.0, 0
    for i in range(chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        params = og.GeneratorParams(backend.model)
        params.set_search_options(max_length=n_ctx, batch_size=1)
        generator = og.Generator(backend.model, params)
        generator.append_tokens(chunk[:first + 1])
        rows = []
        for j in range(first, n_ctx - 1):
            rows.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
            if j + 1 < n_ctx - 1:
                generator.append_tokens([chunk[j + 1]])
        targets = np.asarray(chunk[first + 1:], dtype=np.int64)
        total += float(negative_log_likelihood(np.stack(rows), targets).sum())
        count += len(targets)
        if progress is not None:
            progress(i + 1, chunks)
    return PerplexityResult(float(np.exp(total / count)), chunks, count)


def measure_folder(folder: Path, spec: Any, text: str, items: EvalSet,
                   step: Callable[[str], Callable[[int, int], None] | None],
                   eval_context: int) -> dict[str, Any]:
    """The figures of an ONNX folder that :class:`.measure.Measurement` holds, RAM aside."""
    backend = load_backend(folder, max(eval_context, spec.held_out.context), spec.threads)
    try:
        ppl = perplexity(backend, text, spec.held_out.context, max_chunks=spec.held_out.chunks,
                         progress=step("perplexity"))
        score, answers, per_item = run_eval_set(backend, items, progress=step("eval set"))
        speed = measure_speed(backend)
    finally:
        backend.close()
    return {**answer_figures(score, answers, per_item, speed), "perplexity": ppl.perplexity,
            "size_bytes": folder_size(folder), "tensor_types": {}}
