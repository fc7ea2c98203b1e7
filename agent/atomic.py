"""Durable file operations: a reader sees the old content or the new, never a mix.

Every write goes to a temporary name in the *same directory* (so the final
``os.replace`` is a rename within one filesystem, which POSIX makes atomic),
is fsynced, renamed over the target, and then the directory is fsynced.

Why both fsyncs: after a power loss the kernel may have persisted the rename
(a directory entry) but not the file's data, leaving an empty or truncated
file under the final name; fsyncing the file *before* the rename rules that
out. The rename itself lives in the directory, so until the directory is
fsynced the old name may come back after a reboot; fsyncing the directory
*after* the rename makes the new state the one that survives.

A crash before the rename leaves a stray ``.<name>.*.tmp`` file next to the
target and the target untouched; :func:`remove_stale_temps` clears them.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

_TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that entries created, renamed or removed in it survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (and missing parents) durably: each new entry's parent is fsynced."""
    path = Path(path)
    if path.is_dir():
        return
    ensure_dir(path.parent)
    path.mkdir(exist_ok=True)
    # A new directory is an entry in its parent; without this a power cut can lose it
    # together with everything written inside.
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        # fchmod, not the umask: the mode is what the caller asked for.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # Data on disk before the name points at it (power loss: no empty file).
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename on disk (power loss: the old content would come back otherwise).
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike[str], value: Any, mode: int = 0o600) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically and durably."""
    data = json.dumps(value, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    write_bytes_atomic(path, data, mode)


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """Load JSON from ``path``; ``None`` if it does not exist.

    Raises ``ValueError`` naming the file if it exists but is not valid JSON:
    with atomic writes that means tampering or a failing disk, which the
    caller must see rather than a silent default.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt JSON file {path}: {exc}") from exc


def replace_symlink_atomic(link: str | os.PathLike[str], target: str) -> None:
    """Point the symlink ``link`` at ``target`` atomically and durably.

    ``os.symlink`` refuses to overwrite, and unlink-then-symlink has a window
    with no link at all; a temporary link renamed over the old one has none.
    """
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The swap is a directory entry: persist it (power loss: the old link would come back).
    fsync_dir(link.parent)


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries a crash left in ``directory`` by the functions above.

    Only names of the form ``.<name>.<random>.tmp`` are touched. Returns the
    paths removed.
    """
    removed = []
    for entry in Path(directory).iterdir():
        if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX):
            if entry.is_dir() and not entry.is_symlink():
                continue  # never ours: these helpers only create files and links
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        fsync_dir(directory)
    return removed
