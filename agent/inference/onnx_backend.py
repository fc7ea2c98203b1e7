"""ONNX models through onnxruntime (worker side only).

Two paths. The generic one runs the graph on inputs given by name and
returns the outputs asked for by name (``POST /v1/infer``). The embeddings
path (variants with ``runtime_defaults.embeddings``) feeds ``input_ids``
(plus ``attention_mask`` / ``token_type_ids`` when the graph has them) and
mean-pools the first output over the tokens the mask keeps.

Tokens for the embeddings path are the text's UTF-8 bytes: an ONNX variant
ships no tokenizer yet (the store holds the model file alone), so a byte
vocabulary is the one the agent can apply to any text without guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from .backend import Backend, BadRequest, Completion

#: largest tensor a generic request may send, in elements
MAX_INPUT_ELEMENTS = 1 << 20

_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64,
    "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def choose_providers(wanted: list[str]) -> tuple[list[str], str | None]:
    """The providers to run with, and why some wanted ones are missing (or None)."""
    available = ort.get_available_providers()
    usable = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if not usable:
        usable = ["CPUExecutionProvider"]
    reason = None
    if missing:
        reason = (f"{', '.join(missing)} not available in this onnxruntime "
                  f"(has {', '.join(available)}); running on {', '.join(usable)}")
    return usable, reason


class OnnxBackend(Backend):
    """One ``onnxruntime.InferenceSession``."""

    def __init__(self, model: str, runtime: dict[str, Any]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = runtime["threads"]
        options.inter_op_num_threads = 1
        providers, self.fallback = choose_providers(list(runtime.get("onnx_providers") or []))
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ValueError(f"onnxruntime cannot load the model: {exc}") from exc
        self.embeddings = bool(runtime["embeddings"])
        self.context = runtime["context"]
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.embeddings and "input_ids" not in self.inputs:
            raise ValueError("an embeddings model needs an input named input_ids, "
                             f"this one has {sorted(self.inputs)}")

    def info(self) -> dict[str, Any]:
        """See :meth:`Backend.info`."""
        return {
            "runtime": "onnxruntime", "onnxruntime_version": ort.__version__,
            "providers": self.session.get_providers(), "provider_fallback": self.fallback,
            "inputs": {n: {"type": i.type, "shape": [d if isinstance(d, int) else None
                                                     for d in i.shape]}
                       for n, i in self.inputs.items()},
            "outputs": self.outputs, "embeddings": self.embeddings,
        }

    def complete(self, request: dict[str, Any], emit: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> Completion:
        """Refuse, naming ``response_format`` when the request asks for JSON:
        no ONNX path generates text, let alone under a grammar."""
        kind = (request.get("response_format") or {}).get("type")
        if kind in ("json_object", "json_schema"):
            raise BadRequest(f"response_format {kind!r} is not supported for ONNX models "
                             "(no grammar-constrained generation)", code="unsupported_parameter")
        return super().complete(request, emit, cancelled)

    def infer(self, inputs: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        """See :meth:`Backend.infer`."""
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise BadRequest(f"unknown inputs {unknown}; the model takes {sorted(self.inputs)}")
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise BadRequest(f"missing inputs {missing}")
        wanted = outputs or self.outputs
        bad = sorted(set(wanted) - set(self.outputs))
        if bad:
            raise BadRequest(f"unknown outputs {bad}; the model gives {self.outputs}")
        feed = {}
        for name, value in inputs.items():
            dtype = _DTYPES.get(self.inputs[name].type)
            if dtype is None:
                raise BadRequest(f"input {name}: type {self.inputs[name].type} is not supported")
            try:
                array = np.asarray(value, dtype=dtype)
            except (ValueError, TypeError) as exc:
                raise BadRequest(f"input {name}: not a {self.inputs[name].type} tensor: {exc}") \
                    from exc
            if array.size > MAX_INPUT_ELEMENTS:
                raise BadRequest(f"input {name}: {array.size} elements, limit "
                                 f"{MAX_INPUT_ELEMENTS}", status=413)
            feed[name] = array
        try:
            results = self.session.run(wanted, feed)
        except Exception as exc:  # shape or type mismatch, reported by onnxruntime
            raise BadRequest(f"the model rejected the inputs: {exc}") from exc
        return {
            name: {"dtype": str(r.dtype), "shape": list(r.shape), "data": r.tolist()}
            for name, r in zip(wanted, results, strict=True)
        }

    def _embed_one(self, text: str) -> tuple[list[float], int]:
        ids = np.frombuffer(text.encode()[: self.context], dtype=np.uint8).astype(np.int64)
        if ids.size == 0:
            raise BadRequest("cannot embed an empty text")
        ids = ids.reshape(1, -1)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run([self.outputs[0]], feed)[0]
        if hidden.ndim == 3:  # (batch, tokens, dim): mean over the tokens kept
            weights = mask[..., None].astype(hidden.dtype)
            vector = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
        elif hidden.ndim == 2:  # already pooled by the graph
            vector = hidden
        else:
            raise BadRequest(f"output {self.outputs[0]} has rank {hidden.ndim}, "
                             "expected (batch, tokens, dim) or (batch, dim)")
        return vector[0].astype(np.float32).tolist(), int(ids.size)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """See :meth:`Backend.embed`."""
        if not self.embeddings:
            raise BadRequest("this model does not serve embeddings", code="unsupported")
        vectors, tokens = [], 0
        for text in texts:
            vector, n = self._embed_one(text)
            vectors.append(vector)
            tokens += n
        return vectors, tokens
