"""How much RAM one more model needs, and how much the device has free for it.

The need is the fit check's (:mod:`protocol.fit`): the release's stated
figure or weights plus a KV cache per slot, computed when the version's
spec is built (:func:`agent.inference.spec.spec_for_version`). A spec
built without its release (a test, a health check's candidate) falls back
to the same arithmetic over the file: its size as the weights and, for a
GGUF, its parameter count from the file's metadata.
"""

from __future__ import annotations

import math
from pathlib import Path

from protocol.fit import WEIGHTS_OVERHEAD_FACTOR, kv_cache_allowance_bytes

from .spec import ModelSpec

MEMINFO = Path("/proc/meminfo")


def mem_available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """The kernel's ``MemAvailable``: what can be allocated without swapping (None
    where the kernel does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ram_needed(spec: ModelSpec, slots: int) -> int:
    """Bytes ``spec``'s worker needs serving ``slots`` callers at once."""
    if spec.ram_bytes:
        return spec.ram_bytes
    try:
        size = spec.path.stat().st_size
    except OSError:
        return 0
    weights = math.ceil(size * WEIGHTS_OVERHEAD_FACTOR)
    if spec.format != "gguf":
        return weights
    from .ollama_model_info import parameter_count

    # Unknown count: one byte per parameter over-counts the KV cache of a quantized file.
    parameters = parameter_count(spec.path, spec.sha256) or max(size, 1)
    return weights + slots * kv_cache_allowance_bytes(parameters, spec.runtime.context)
