"""The demo's low-quality release: SmolLM2-135M quantized aggressively, built once into the cache.

It loads, answers the demo's golden prompts and decodes as fast as the
good release, so every health check passes; but it answers clearly fewer
of the evaluation set's questions (``examples/smollm2.eval.json``), which
only the ``min_eval_ratio`` gate catches. The type was chosen by measuring
the candidates on this model (docs/benchmarks.md, "Evaluation sets"):
SmolLM2-135M's width (576) is no multiple of 256, so K-quants fall back to
32-wide types for most tensors and Q2_K comes out close to Q4_0; Q2_0
(2-bit, 32-wide blocks) is what takes the answers down.

The file is made with llama.cpp's own quantizer (``llama_model_quantize``
through llama-cpp-python, requantizing the Q4_1 source) and cached beside
the source, its name keyed by the llama-cpp-python version and the
source's size, so a new llama.cpp or another source builds it again.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

#: llama.cpp's file type for the low-quality variant (see the module docstring)
LOW_QUALITY_TYPE = "Q2_0"


def low_quality_model(source: Path, ftype: str = LOW_QUALITY_TYPE) -> Path:
    """``source`` quantized to ``ftype`` (``LLAMA_FTYPE_MOSTLY_<ftype>``), built once."""
    import llama_cpp

    version = getattr(llama_cpp, "__version__", "0")
    target = source.parent / (f"{source.stem}.{ftype}-llama{version}-"
                              f"{source.stat().st_size}.gguf")
    if target.is_file():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True  # the source is quantized already
    params.nthread = min(os.cpu_count() or 1, 4)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(),
                                            ctypes.byref(params))
        if rc != 0 or not partial.is_file():
            raise RuntimeError(f"llama_model_quantize {source} -> {ftype} failed ({rc})")
        # Whole or not at all: a demo interrupted mid-build builds it again next time.
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
