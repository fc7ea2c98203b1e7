"""The demo's low-quality release: SmolLM2-135M quantized aggressively, built once into the cache.

It loads, answers the demo's golden prompts and decodes about as fast as
the good release, so every health check passes; but it answers clearly
fewer of the evaluation set's questions (``examples/smollm2.eval.json``),
which only the ``min_eval_ratio`` gate catches. The type was chosen by
measuring candidates on this model (docs/benchmarks.md, "Evaluation sets
and the quality gate"): SmolLM2-135M's width (576) is no multiple of 256,
so Q2_K falls back to Q4_0 for every 576-wide tensor and gives the
1536-wide ``ffn_down`` Q3_K; that costs about a third of the set's answers.
Anything with 2-bit blocks (Q2_0 on every tensor, or only on ``ffn_down``,
or only on the last layers, or Q2_K on ``ffn_down``) wrecks the model
outright: it no longer answers the golden prompts either.

The file is made with llama.cpp's own quantizer (``llama_model_quantize``
through llama-cpp-python, requantizing the Q4_1 source) and cached beside
the source, its name keyed by the llama-cpp-python version and the
source's size, so a new llama.cpp or another source builds it again.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

#: llama.cpp's file type for the low-quality variant (see the module docstring)
LOW_QUALITY_TYPE = "Q2_K"


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


def publish_low_quality(publish: Callable[..., None], source: Path,
                        log: Callable[[str], None]) -> bool:
    """Publish the demo's low-quality release (``publish``: the demo's publisher).

    Returns False, saying why, when ``source`` cannot be quantized (not a
    model llama.cpp reads): the demo then leaves that rollout out.
    """
    from .demo_specs import DEMO_EVAL_SET, LOW_QUALITY_VERSION

    if not DEMO_EVAL_SET.is_file():
        raise RuntimeError(f"the demo's evaluation set {DEMO_EVAL_SET} is missing")
    try:
        model = low_quality_model(source)
    except RuntimeError as exc:
        log(f"no low-quality release: {exc}")
        return False
    publish(LOW_QUALITY_VERSION, model, quantization=LOW_QUALITY_TYPE, eval_set=DEMO_EVAL_SET,
            description=f"SmolLM2-135M-Instruct {LOW_QUALITY_TYPE}: healthy, but it answers "
                        "fewer of the evaluation set's questions (stopped by min_eval_ratio)")
    return True
