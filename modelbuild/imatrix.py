"""Importance matrices: llama.cpp's GGUF imatrix files, read for ``llama_model_quantize``.

An importance matrix (made by llama.cpp's ``llama-imatrix`` over a
calibration text) weighs each input column of each weight tensor by how
much it mattered, so rounding spends its error where it matters least. The
file holds, per tensor, ``<name>.in_sum2`` (summed squared activations, one
row per expert) and ``<name>.counts`` (tokens seen, per expert); the weight
of a column is ``in_sum2 / counts`` (1 where nothing was seen), as
llama-quantize's own loader computes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_SUMS, _COUNTS = ".in_sum2", ".counts"


class ImatrixError(ValueError):
    """The file is not a GGUF importance matrix."""


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Tensor name -> its column weights (float32, experts concatenated)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ImatrixError(f"{path} is not a GGUF importance matrix: {exc}") from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if tensor.name.endswith(_SUMS):
            sums[tensor.name.removesuffix(_SUMS)] = data
        elif tensor.name.endswith(_COUNTS):
            counts[tensor.name.removesuffix(_COUNTS)] = data
    if not sums:
        raise ImatrixError(f"{path} holds no {_SUMS} tensors: not an importance matrix")
    weights = {}
    for name, summed in sums.items():
        if name not in counts or len(summed) % len(counts[name]):
            raise ImatrixError(f"{path}: {name} has no matching {_COUNTS}")
        seen = counts[name]
        rows = summed.reshape(len(seen), -1)
        weights[name] = np.where(seen[:, None] > 0, rows / np.maximum(seen[:, None], 1), 1.0
                                 ).astype(np.float32).reshape(-1)
    return weights
