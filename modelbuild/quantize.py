"""Quantize a GGUF with llama.cpp's own ``llama_model_quantize``, in a child process.

A child process because llama.cpp aborts the whole process on some bad
inputs (``GGML_ABORT``), and because it writes a line per tensor to
stderr: the child's output goes to a log file beside the variant, and a
failure names it. ``allow_requantize`` is on: the source may itself be
quantized (SmolLM2's is Q4_1).

Run as ``python -m modelbuild.quantize SOURCE OUT ARGS_JSON``.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

from .quant_types import file_type, tensor_type


class QuantizeError(RuntimeError):
    """llama.cpp could not quantize the source into the asked type."""


def quantize(source: Path, out: Path, type_name: str, overrides: dict[str, str], *,
             threads: int, log: Path) -> None:
    """Write ``source`` quantized to ``type_name`` at ``out`` (``overrides``: regex -> type)."""
    args = json.dumps({"type": type_name, "overrides": overrides, "threads": threads})
    with open(log, "wb") as sink:
        done = subprocess.run([sys.executable, "-m", __name__, str(source), str(out), args],
                              stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise QuantizeError(f"llama.cpp could not quantize to {type_name} (exit "
                            f"{done.returncode}; log {log}): {' | '.join(tail)}")


def _run(source: str, out: str, args: dict) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(args["type"])
    params.allow_requantize = True
    params.nthread = args["threads"]
    overrides = list(args["overrides"].items())
    # kept referenced until the call returns: llama.cpp reads the C strings through them
    patterns = [pattern.encode() for pattern, _ in overrides]
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (_, kind) in enumerate(overrides):
        table[i].pattern = patterns[i]
        table[i].type = tensor_type(kind)
    table[len(overrides)].pattern = None  # the list ends at a null pattern
    if overrides:
        pointer = ctypes.POINTER(llama_cpp.llama_model_tensor_override)
        params.tt_overrides = ctypes.cast(table, pointer)
    return llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
