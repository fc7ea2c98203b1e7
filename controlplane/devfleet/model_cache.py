"""Where scripts/bootstrap.sh puts the SmolLM2-135M builds the demo, tests and benchmarks use.

One definition, following the same variables as the script:
``$SLMFLEET_CACHE``, else ``$XDG_CACHE_HOME/slmfleet``, else ``~/.cache/slmfleet``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the file scripts/bootstrap.sh fetches (SmolLM2-135M-Instruct, Q4_1 GGUF)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """scripts/bootstrap.sh's cache directory."""
    explicit = os.environ.get("SLMFLEET_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slmfleet"


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF's path (whether or not it has been fetched yet)."""
    return cache_dir() / "models" / SMOLLM2_FILE


def onnx_genai_path() -> Path | None:
    """The newest onnxruntime-genai SmolLM2 folder scripts/build-onnx-genai.sh built, or None."""
    folders = [p.parent for p in (cache_dir() / "models").glob("onnx-genai-*/genai_config.json")
               if not p.parent.name.endswith(".partial")]
    return max(folders, key=lambda p: p.stat().st_mtime, default=None)
