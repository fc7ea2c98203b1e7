"""A folder variant's files, listed from a local model folder for publishing.

Every regular file under the folder becomes one entry, its path relative to
the folder. Refused, each with the path that broke the rule: a symlink
(anywhere inside: it could name a file outside the folder, and what the
agent installs must be what was hashed), anything that is not a regular
file, a hidden name (the store keeps hidden names for itself), a path the
manifest cannot carry, and more files than a variant may list.
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol import MAX_VARIANT_FILES
from protocol.variant_files import MAX_FILE_PATH, check_relative_path


class FolderError(ValueError):
    """The folder cannot be published as a variant."""


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """``(path inside the folder, file on disk)`` for every file under ``folder``, by path."""
    root = folder.resolve()
    if not root.is_dir():
        raise FolderError(f"{folder} is not a folder")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            entry = here / name
            rel = entry.relative_to(root).as_posix()
            if entry.is_symlink():
                raise FolderError(f"{folder}: {rel} is a symlink; copy the file into the "
                                  "folder instead (a variant is exactly the files it lists)")
            if name.startswith("."):
                raise FolderError(f"{folder}: {rel} is hidden; remove it (hidden names are "
                                  "the artifact store's own)")
            if name in filenames:
                if not entry.is_file():
                    raise FolderError(f"{folder}: {rel} is not a regular file")
                found.append((_checked(folder, rel), entry))
    if not found:
        raise FolderError(f"{folder} holds no files")
    if len(found) > MAX_VARIANT_FILES:
        raise FolderError(f"{folder} holds {len(found)} files; a variant lists at most "
                          f"{MAX_VARIANT_FILES}")
    # os.walk guarantees every entry lies under root, and no symlink was followed.
    return sorted(found)


def _checked(folder: Path, rel: str) -> str:
    if len(rel) > MAX_FILE_PATH:
        raise FolderError(f"{folder}: {rel} is longer than {MAX_FILE_PATH} characters")
    try:
        return check_relative_path(rel, f"{folder}: {rel}")
    except ValueError as exc:
        raise FolderError(str(exc)) from exc
