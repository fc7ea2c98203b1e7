"""Where scripts/bootstrap.sh puts the SmolLM2-135M GGUF the demo, tests and benchmarks use.

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
