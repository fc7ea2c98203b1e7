"""Free disk space where models live.

Its own module so the long-lived agent process can ask for it (every
``hello`` reports the current figure) without importing :mod:`agent.probe`
and psutil, which only the one-shot hardware probe child needs.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def disk_free_bytes(model_dir: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``model_dir``."""
    path = model_dir.absolute()
    # The model directory may not exist yet on first start; the filesystem
    # it will be created on is the one that matters.
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
