"""Several generations decoded together in one llama.cpp context (worker side).

The loop of llama.cpp's own server (``update_slots``): one thread owns the
context; each step builds one batch holding the next token of every
sequence that is generating, then as much prompt of the sequences still
reading theirs as fits in ``n_batch`` (prefill in chunks, so a long prompt
does not stall the others), decodes it once, and draws a token for each
sequence whose logits came out. Requests join between two steps and leave
on an end-of-generation token, a stop string, ``max_tokens`` or a cancel;
their KV cells are kept for the next request that starts with the same
tokens (a health check, a chat that goes on), like llama.cpp's prompt cache.

A LoRA adapter applies to the whole context (:mod:`.lora`), so requests
naming different adapters take turns, in the order they came: a request
whose adapter is not the applied one waits until the sequences decoding
now have ended, then the adapter changes and the cached cells, computed
under the other one, are dropped.

Each sequence id owns ``n_ctx / n_seq_max`` cells of the KV cache (the
context is not unified), so a sequence always has the room the prompt check
promised it and one caller's long answer cannot starve another.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp

from .backend import BadRequest, Completion
from .sampling import TokenSampler
from .text_stream import TextStream

if TYPE_CHECKING:
    from .lora import AdapterSet

log = logging.getLogger(__name__)

#: bytes of the largest single-token piece expected (a longer one is read again)
PIECE_BUFFER = 128


@dataclass(eq=False)
class Job:
    """One generation handed to :meth:`BatchDecoder.submit` (prompt already tokenized)."""

    tokens: list[int]
    stop: list[str]
    #: the chat template's end-of-turn test, called with the tokens so far
    stop_tokens: Callable[[list[int], Any], bool] | None
    max_tokens: int
    sampler: TokenSampler
    emit: Callable[[str], None]
    cancelled: Callable[[], bool]
    #: called once, from the decoding thread: a Completion, or the exception that ended it
    finished: Callable[[Completion | BaseException], None]
    #: the LoRA adapter it runs with (None: the base model alone)
    adapter: str | None = None


@dataclass(eq=False)
class _Sequence:
    job: Job
    seq: int
    #: tokens in the KV cache for this sequence
    cached: list[int]
    #: tokens still to decode (the rest of the prompt, or the last token drawn)
    feed: list[int]
    text: TextStream
    generated: int = 0
    seen: list[int] = field(default_factory=list)


class BatchDecoder:
    """The decoding thread of one context with ``n_seq`` sequences (see the module docstring)."""

    def __init__(self, ctx: Any, vocab: Any, n_seq: int, n_batch: int,
                 adapters: AdapterSet | None = None) -> None:
        self._ctx, self._vocab = ctx, vocab
        self._adapters = adapters
        #: work for the decoding thread once no sequence decodes (freeing an adapter)
        self._between: list[Callable[[], None]] = []
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._buffer = ctypes.create_string_buffer(PIECE_BUFFER)
        #: tokens in the KV cache of each free sequence id
        self._free: dict[int, list[int]] = {seq: [] for seq in range(n_seq)}
        self._active: list[_Sequence] = []
        self._incoming: list[Job] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decoder", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> int:
        """Generations submitted and not finished."""
        with self._wake:
            return len(self._active) + len(self._incoming)

    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts at the next step with a free sequence id."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._incoming.append(job)
            self._wake.notify()

    def between_turns(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the decoding thread once no sequence decodes."""
        with self._wake:
            self._between.append(action)
            self._wake.notify()

    def close(self) -> None:
        """Finish what was submitted, then stop the thread and free the batch.

        Generations are not cut short here: a worker asked to exit is either
        idle (its slots drained before a swap) or past its grace period, when
        the agent kills it and its callers learn it stopped.
        """
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)

    # -- the decoding thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while (not self._closed and not self._incoming and not self._active
                       and not self._between):
                    self._wake.wait()
                if not self._incoming and not self._active and not self._between:
                    break  # closed, and nothing left to finish
                if not self._active:
                    self._run_between()
                    self._turn()
                # In order, and only those of the applied adapter's turn.
                while (self._incoming and self._free
                       and self._incoming[0].adapter == self._applied()):
                    self._admit(self._incoming.pop(0))
            try:
                self._step()
            except Exception as exc:  # a bug here must fail the requests, not hang them
                log.exception("decoding step failed")
                for sequence in list(self._active):
                    self._end(sequence, exc)

    def _applied(self) -> str | None:
        return self._adapters.applied if self._adapters is not None else None

    def _run_between(self) -> None:
        actions, self._between = self._between, []
        for action in actions:
            try:
                action()
            except Exception:  # freeing one adapter failed; decoding goes on
                log.exception("work between turns failed")

    def _turn(self) -> None:
        """No sequence decodes: give the next request's adapter its turn."""
        if not self._incoming:
            return
        wanted = self._incoming[0].adapter
        try:
            if self._adapters is None:
                if wanted is not None:
                    raise BadRequest("this model takes no adapters", code="unsupported")
                return
            changed = self._adapters.apply(wanted)
        except Exception as exc:  # an unknown adapter fails its request, not the others
            job = self._incoming.pop(0)
            job.sampler.free()
            job.finished(exc)
            return
        if changed:
            # Cells computed under the other adapter must not be reused as a prefix.
            llama_cpp.llama_memory_clear(self._memory, True)
            self._free = {seq: [] for seq in self._free}

    def _admit(self, job: Job) -> None:
        # The free sequence whose cache shares the longest start with this prompt.
        seq, shared = max(((s, _common_prefix(c, job.tokens)) for s, c in self._free.items()),
                          key=lambda pair: pair[1])
        cached = self._free.pop(seq)
        # At least the last prompt token is decoded again: its logits draw the first token.
        keep = min(shared, len(job.tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            keep = 0
        self._active.append(_Sequence(job, seq, cached[:keep], job.tokens[keep:],
                                      TextStream(job.stop), seen=list(job.tokens)))

    def _step(self) -> None:
        for sequence in [s for s in self._active if s.job.cancelled()]:
            self._end(sequence, Completion("stop", len(sequence.job.tokens), sequence.generated))
        if not self._active:
            return
        batch, n, members, sampled = self._batch, 0, [], []
        # Generating sequences first (one token each), then prompt chunks in the room left.
        for sequence in sorted(self._active, key=lambda s: len(s.feed) > 1):
            take = min(len(sequence.feed), self._n_batch - n)
            if take <= 0:
                break
            start = len(sequence.cached)
            for i, token in enumerate(sequence.feed[:take]):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sequence.seq
                batch.logits[n] = False
                n += 1
            sequence.cached += sequence.feed[:take]
            del sequence.feed[:take]
            members.append(sequence)
            if not sequence.feed:
                batch.logits[n - 1] = True
                sampled.append((sequence, n - 1))
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            # No room in the KV cache, or the decode was aborted: the batch's sequences fail.
            error = RuntimeError(f"llama_decode returned {status}")
            for sequence in members:
                self._end(sequence, error)
            return
        for sequence, index in sampled:
            self._next(sequence, llama_cpp.llama_get_logits_ith(self._ctx, index))

    def _next(self, sequence: _Sequence, logits: Any) -> None:
        job = sequence.job
        token = job.sampler.sample(logits)
        sequence.seen.append(token)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token) or (
                job.stop_tokens is not None and job.stop_tokens(sequence.seen, None)):
            self._send(sequence, sequence.text.finish())
            self._end(sequence, Completion("stop", len(job.tokens), sequence.generated))
            return
        job.sampler.accept(token)
        self._send(sequence, sequence.text.feed(self._piece(token)))
        if sequence.text.stopped:
            # The token that completed a stop string is not part of the answer.
            self._end(sequence, Completion("stop", len(job.tokens), sequence.generated))
            return
        sequence.generated += 1
        if sequence.generated >= job.max_tokens:
            self._send(sequence, sequence.text.finish())
            self._end(sequence, Completion("length", len(job.tokens), sequence.generated))
            return
        sequence.feed.append(token)

    def _send(self, sequence: _Sequence, text: str) -> None:
        if text:
            sequence.job.emit(text)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            size = llama_cpp.llama_token_to_piece(self._vocab, token, self._buffer,
                                                  PIECE_BUFFER, 0, False)
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -size, 0, False)
                piece = buffer.raw[:size]
            else:
                piece = self._buffer.raw[:size]
            self._pieces[token] = piece
        return piece

    def _end(self, sequence: _Sequence, outcome: Completion | BaseException) -> None:
        self._active.remove(sequence)
        sequence.job.sampler.free()
        cached = sequence.cached
        if isinstance(outcome, BaseException):
            llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq, -1, -1)
            cached = []
        with self._wake:
            self._free[sequence.seq] = cached
        try:
            sequence.job.finished(outcome)
        except Exception:  # the reply channel is gone; the other sequences go on
            log.exception("reporting the end of a generation failed")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
