"""Choosing one sequence's next token from its logits (worker side).

The chain is the one llama-cpp-python's ``create_completion`` builds, so
answers keep their character: repetition penalties (frequency, presence)
over the last 64 tokens, then greedy at temperature 0, else top-k 40,
top-p, min-p 0.05, temperature and a seeded draw.

A grammar (``response_format``) takes llama.cpp's cheaper path
(``common_sampler_sample``): the token is drawn without the grammar, then
that one token is checked against it; only when the grammar rejects it is
the grammar applied to the whole vocabulary and the token drawn again.
Checking the whole vocabulary costs far more than a decode step of a small
model, and the model mostly picks a token the grammar allows anyway.
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import llama_cpp
import numpy as np

#: tokens the repetition penalties look back over (llama-cpp-python's default)
PENALTY_LAST_N = 64
#: the draws create_completion makes by default, kept so answers read the same
TOP_K, MIN_P = 40, 0.05

_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class TokenSampler:
    """One sequence's sampler chain, and its grammar if the request has one."""

    def __init__(self, vocab: Any, n_vocab: int, request: dict[str, Any],
                 grammar_text: str | None) -> None:
        self._n_vocab = n_vocab
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        self._grammar = None
        try:
            self._add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, 1.0, float(request.get("frequency_penalty") or 0.0),
                float(request.get("presence_penalty") or 0.0)))
            temperature = request.get("temperature", 1.0)
            temperature = 1.0 if temperature is None else float(temperature)
            if temperature == 0.0:
                self._add(llama_cpp.llama_sampler_init_greedy())
            else:
                top_p = request.get("top_p", 1.0)
                self._add(llama_cpp.llama_sampler_init_top_k(TOP_K))
                self._add(llama_cpp.llama_sampler_init_top_p(
                    1.0 if top_p is None else float(top_p), 1))
                self._add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
                self._add(llama_cpp.llama_sampler_init_temp(temperature))
                seed = request.get("seed")
                self._add(llama_cpp.llama_sampler_init_dist(
                    random.getrandbits(32) if seed is None else int(seed) & 0xFFFFFFFF))
            if grammar_text is not None:
                # prompting.grammar_text checked that it parses: never a null sampler here.
                self._grammar = llama_cpp.llama_sampler_init_grammar(
                    vocab, grammar_text.encode(), b"root")
        except BaseException:
            self.free()
            raise
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._cur = np.zeros(n_vocab, dtype=_CANDIDATE)
        self._one = llama_cpp.llama_token_data(0, 1.0, 0.0)

    def _add(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _candidates(self, logits: Any) -> llama_cpp.llama_token_data_array:
        cur = self._cur
        cur["id"] = self._ids
        cur["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        cur["p"] = 0.0
        data = cur.ctypes.data_as(llama_cpp.llama_token_data_p)
        return llama_cpp.llama_token_data_array(data, self._n_vocab, -1, False)

    def _draw(self, candidates: llama_cpp.llama_token_data_array) -> int:
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(candidates))
        # Read through the array: a sampler may have pointed it at its own buffer.
        return int(candidates.data[candidates.selected].id)

    def _grammar_allows(self, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0
        single = llama_cpp.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(single))
        return not math.isinf(one.logit)

    def sample(self, logits: Any) -> int:
        """The next token, from a pointer to the vocabulary's logits (not yet accepted)."""
        token = self._draw(self._candidates(logits))
        if self._grammar is None or self._grammar_allows(token):
            return token
        candidates = self._candidates(logits)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        return self._draw(candidates)

    def accept(self, token: int) -> None:
        """``token`` is part of the answer: the penalties and the grammar move past it."""
        llama_cpp.llama_sampler_accept(self._chain, token)
        if self._grammar is not None:
            llama_cpp.llama_sampler_accept(self._grammar, token)

    def free(self) -> None:
        """Release the native samplers (the chain owns the ones added to it)."""
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
