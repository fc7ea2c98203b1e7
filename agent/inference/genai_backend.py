"""Generative ONNX models through onnxruntime-genai (worker side only).

A model is a folder as onnxruntime-genai's model builder (or Olive, or
Foundry Local) writes it: ``genai_config.json``, ``model.onnx`` and its
``model.onnx.data``, and the tokenizer files with the chat template. The
folder is the signed artifact, so nothing here writes to it: execution
providers and threads are set on the in-memory ``og.Config`` at load.

One generation at a time (``slots`` 0): onnxruntime-genai's generator is
one sequence, and the worker's frame loop runs each ``complete`` in turn.
Sampling maps onto its search options (greedy at temperature 0, else top-k
40 like the GGUF path, ``top_p``, ``temperature``, ``random_seed``);
``response_format`` and tool calls run under its guided decoding
(llguidance, a JSON schema: :mod:`.genai_guidance`). What it has no way to
honour (the repetition penalties) is refused with a 400 naming the field,
never dropped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime_genai as og

from . import tool_calls
from .backend import GENAI_CONFIG, Backend, BadRequest, Completion
from .genai_guidance import guidance_schema
from .text_stream import TextStream

#: top-k of a sampled (temperature > 0) answer, as the GGUF path draws
TOP_K = 40

#: onnxruntime's provider names -> onnxruntime-genai's (``Config.append_provider``)
GENAI_PROVIDERS = {
    "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
    "QNNExecutionProvider": "QNN", "OpenVINOExecutionProvider": "OpenVINO",
    "WebGpuExecutionProvider": "WebGPU", "NvTensorRTRTXExecutionProvider": "NvTensorRtRtx",
}


def _usable_providers(wanted: list[str]) -> tuple[list[str], str | None]:
    """The providers to run with, and why a wanted one is not used (None: all are).

    Checked against the onnxruntime that onnxruntime-genai runs on, as the
    generic ONNX path checks it, so a missing provider falls back to CPU
    with the same reason.
    """
    from .onnx_backend import choose_providers

    usable, reason = choose_providers(wanted)
    unmapped = [p for p in usable if p != "CPUExecutionProvider" and p not in GENAI_PROVIDERS]
    if unmapped:
        usable = [p for p in usable if p not in unmapped] or ["CPUExecutionProvider"]
        note = f"{', '.join(unmapped)} has no onnxruntime-genai name; running on " \
               f"{', '.join(usable)}"
        reason = f"{reason}; {note}" if reason else note
    return usable, reason


def _configure(folder: str, runtime: dict[str, Any], usable: list[str]) -> og.Config:
    """The folder's config with ``usable`` providers and the threads set in memory."""
    config = og.Config(folder)
    # The folder's own provider list is replaced, never edited: CPU is what
    # onnxruntime-genai runs when the list is empty.
    config.clear_providers()
    for provider in usable:
        if provider != "CPUExecutionProvider":
            config.append_provider(GENAI_PROVIDERS[provider])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": int(runtime["threads"]), "inter_op_num_threads": 1}}}}))
    return config


def _load(folder: str, runtime: dict[str, Any]) -> tuple[og.Model, list[str], str | None]:
    """The model on the first usable providers, else on the CPU (with the reason)."""
    usable, reason = _usable_providers(list(runtime.get("onnx_providers") or []))
    try:
        return og.Model(_configure(folder, runtime, usable)), usable, reason
    except RuntimeError as exc:
        if usable == ["CPUExecutionProvider"]:
            raise
        # onnxruntime has the provider, yet this onnxruntime-genai build cannot
        # use it (e.g. a CPU-only onnxruntime-genai beside onnxruntime-gpu).
        note = f"onnxruntime-genai cannot run on {', '.join(usable)} ({exc}); running on " \
               "CPUExecutionProvider"
        cpu = ["CPUExecutionProvider"]
        model = og.Model(_configure(folder, runtime, cpu))
        return model, cpu, f"{reason}; {note}" if reason else note


class GenaiBackend(Backend):
    """One ``og.Model`` and its tokenizer; answers one request at a time."""

    def __init__(self, folder: str, runtime: dict[str, Any]) -> None:
        if runtime.get("embeddings"):
            raise ValueError("an onnxruntime-genai model generates text; it does not serve "
                             "embeddings")
        try:
            with open(Path(folder) / GENAI_CONFIG, encoding="utf-8") as fh:
                model_context = int(json.load(fh)["model"]["context_length"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{GENAI_CONFIG} does not name model.context_length: {exc}") \
                from exc
        try:
            self.model, self.providers, self.fallback = _load(folder, runtime)
            self.tokenizer = og.Tokenizer(self.model)
        except RuntimeError as exc:  # onnxruntime-genai raises RuntimeError for every failure
            raise ValueError(f"onnxruntime-genai cannot load the model: {exc}") from exc
        self.context = min(int(runtime["context"]), model_context)
        self.threads = int(runtime["threads"])
        self.eos = set(self.tokenizer.eos_token_ids)

    def info(self) -> dict[str, Any]:
        """See :meth:`Backend.info`."""
        return {"runtime": "onnxruntime-genai", "onnxruntime_genai_version": og.__version__,
                "model_type": self.model.type, "providers": self.providers,
                "provider_fallback": self.fallback, "context": self.context,
                "threads": self.threads, "embeddings": False, "parallel": 1}

    def _prompt_tokens(self, request: dict[str, Any]) -> list[int]:
        if "messages" not in request:
            return list(self.tokenizer.encode(request["prompt"]))
        # The template sees text turns only (the tools and the envelope in the
        # system message, earlier calls and results as text), as the GGUF path
        # renders them for a template without tools.
        plan = tool_calls.ToolPlan.from_wire(request.get("tools"))
        messages = tool_calls.render_messages(request["messages"], plan)
        text = self.tokenizer.apply_chat_template(json.dumps(messages),
                                                  add_generation_prompt=True)
        return list(self.tokenizer.encode(text))

    def _params(self, request: dict[str, Any], max_length: int) -> og.GeneratorParams:
        for name in ("frequency_penalty", "presence_penalty"):
            if request.get(name):
                raise BadRequest(f"'{name}' is not supported for onnxruntime-genai models "
                                 "(no repetition penalty over a window)",
                                 code="unsupported_parameter")
        params = og.GeneratorParams(self.model)
        temperature = request.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else float(temperature)
        options: dict[str, Any] = {"max_length": max_length, "batch_size": 1}
        if temperature == 0.0:
            options["do_sample"] = False
        else:
            top_p = request.get("top_p", 1.0)
            seed = request.get("seed")
            options.update(do_sample=True, temperature=temperature, top_k=TOP_K,
                           top_p=1.0 if top_p is None else float(top_p),
                           # onnxruntime-genai takes a non-negative 31-bit seed
                           random_seed=random.getrandbits(31) if seed is None
                           else int(seed) & 0x7FFFFFFF)
        params.set_search_options(**options)
        guidance = guidance_schema(request)
        if guidance is not None:
            try:
                params.set_guidance("json_schema", guidance)
            except RuntimeError as exc:
                field = "tools" if request.get("tools") else "response_format"
                raise BadRequest(f"{field}: guided decoding refused the schema: {exc}",
                                 code="unsupported_schema") from exc
        return params

    def complete(self, request: dict[str, Any], emit: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> Completion:
        """See :meth:`Backend.complete`."""
        tokens = self._prompt_tokens(request)
        room = self.context - len(tokens)
        max_tokens = request.get("max_tokens") or room
        if room <= 0 or max_tokens > room:
            raise BadRequest(
                f"prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context window ({self.context} tokens)", code="context_length_exceeded")
        params = self._params(request, len(tokens) + max_tokens)
        try:
            generator = og.Generator(self.model, params)
            return self._generate(generator, tokens, max_tokens, list(request.get("stop") or []),
                                  emit, cancelled)
        except RuntimeError as exc:
            raise RuntimeError(f"onnxruntime-genai failed: {exc}") from exc

    def _generate(self, generator: og.Generator, tokens: list[int], max_tokens: int,
                  stop: list[str], emit: Callable[[str], None],
                  cancelled: Callable[[], bool]) -> Completion:
        decoder = self.tokenizer.create_stream()
        text = TextStream(stop)
        generator.append_tokens(tokens)
        generated = 0
        finish = "length"
        while generated < max_tokens and not cancelled():
            if generator.is_done():
                finish = "stop"
                break
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            generated += 1
            if token in self.eos:
                finish = "stop"
                break
            piece = text.feed(decoder.decode(token).encode())
            if piece:
                emit(piece)
            if text.stopped:
                finish = "stop"
                break
        else:
            if cancelled():
                finish = "stop"
        rest = text.finish()
        if rest:
            emit(rest)
        return Completion(finish, len(tokens), generated)

    def close(self) -> None:
        """See :meth:`Backend.close`."""
        self.tokenizer = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
