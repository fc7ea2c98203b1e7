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
             threads: int, log: Path, imatrix: Path | None = None) -> None:
    """Write ``source`` quantized to ``type_name`` at ``out`` (``overrides``: regex -> type;
    ``imatrix``: a GGUF importance matrix weighing the rounding)."""
    args = json.dumps({"type": type_name, "overrides": overrides, "threads": threads,
                       "imatrix": None if imatrix is None else str(imatrix)})
    with open(log, "wb") as sink:
        done = subprocess.run([sys.executable, "-m", __name__, str(source), str(out), args],
                              stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise QuantizeError(f"llama.cpp could not quantize to {type_name} (exit "
                            f"{done.returncode}; log {log}): {' | '.join(tail)}")


def _override_table(overrides: dict[str, str]):
    import llama_cpp

    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, kind) in enumerate(overrides.items()):
        table[i].pattern = pattern.encode()
        table[i].type = tensor_type(kind)
    table[len(overrides)].pattern = None  # the list ends at a null pattern
    return table


def _imatrix_table(path: Path, keep: list[object]):
    import llama_cpp

    from .imatrix import load_imatrix

    weights = load_imatrix(path)
    keep.append(weights)
    table = (llama_cpp.llama_model_imatrix_data * (len(weights) + 1))()
    for i, (name, values) in enumerate(weights.items()):
        table[i].name = name.encode()
        table[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        table[i].size = len(values)
    table[len(weights)].name = None  # the list ends at a null name
    return table


def _run(source: str, out: str, args: dict) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(args["type"])
    params.allow_requantize = True
    params.nthread = args["threads"]
    # every table stays referenced until the call returns: llama.cpp reads through them
    keep: list[object] = []
    if args["overrides"]:
        overrides = _override_table(args["overrides"])
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(
            overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if args.get("imatrix"):
        imatrix = _imatrix_table(Path(args["imatrix"]), keep)
        keep.append(imatrix)
        params.imatrix = ctypes.cast(imatrix, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
