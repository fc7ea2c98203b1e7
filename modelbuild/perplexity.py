"""Perplexity computed the way llama.cpp's ``llama-perplexity`` computes it.

``tools/perplexity/perplexity.cpp`` (the vendored llama.cpp), with no stride:

1. the text (one trailing newline dropped, as ``-f`` reads it) is tokenized
   with the model's own special-token setting: a BOS in front only where the
   vocabulary says ``add_bos``;
2. it is cut into whole chunks of ``n_ctx`` tokens (at least two needed; a
   partial last chunk is dropped), each evaluated from an empty KV cache,
   its first token replaced by BOS where the model adds one;
3. only the second half of each chunk is scored (the first half gives every
   scored token at least ``n_ctx / 2`` tokens of context): for positions
   ``j`` in ``[n_ctx/2, n_ctx - 1)``, the negative log-probability of token
   ``j + 1`` under the logits at ``j``;
4. perplexity is ``exp`` of the mean over all scored tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PerplexityError(ValueError):
    """The text is too short for the context, or the model cannot be measured."""


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """One perplexity measurement."""

    perplexity: float
    chunks: int
    scored_tokens: int


def load_scoring_model(path: Path, n_ctx: int, threads: int):
    """``path`` loaded to return logits for every position of an ``n_ctx`` chunk."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           logits_all=True, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-softmax of each row's target (max taken in float, sum in double)."""
    top = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - top).astype(np.float64).sum(axis=1)
    picked = logits[np.arange(len(targets)), targets] - top[:, 0]
    return np.log(sum_exp) - picked.astype(np.float64)


def chunk_count(tokens: int, n_ctx: int, max_chunks: int | None) -> int:
    """Whole chunks of ``n_ctx`` in ``tokens`` (at most ``max_chunks``); at least two needed."""
    if tokens < 2 * n_ctx:
        raise PerplexityError(f"the held-out text is {tokens} tokens; perplexity with a "
                              f"context of {n_ctx} needs at least {2 * n_ctx}")
    chunks = tokens // n_ctx
    return chunks if max_chunks is None else min(chunks, max_chunks)


def perplexity(llm, text: str, n_ctx: int, *, max_chunks: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``llm`` (from :func:`load_scoring_model`) on ``text``, chunks of ``n_ctx``.

    ``progress(done, total)`` is called after each chunk.
    """
    if text.endswith("\n"):
        text = text[:-1]
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    chunks = chunk_count(len(tokens), n_ctx, max_chunks)
    add_bos = llm._model.add_bos_token()
    bos = llm.token_bos()
    first = n_ctx // 2
    total = 0.0
    count = 0
    for i in range(chunks):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float32)
        # the original tokens are the targets, as in llama.cpp (only the input had BOS)
        targets = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx], dtype=np.int64)
        total += float(negative_log_likelihood(logits, targets).sum())
        count += len(targets)
        if progress is not None:
            progress(i + 1, chunks)
    return PerplexityResult(float(np.exp(total / count)), chunks, count)


def perplexity_of_file(path: Path, text: str, n_ctx: int, threads: int,
                       max_chunks: int | None = None) -> PerplexityResult:
    """Load ``path`` and measure its perplexity on ``text`` (see :func:`perplexity`)."""
    llm = load_scoring_model(path, n_ctx, threads)
    try:
        return perplexity(llm, text, n_ctx, max_chunks=max_chunks)
    finally:
        llm.close()
