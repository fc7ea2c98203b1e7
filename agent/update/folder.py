"""Folder variants on the device: fetched file by file, checked as a whole.

A folder variant (an onnxruntime-genai model: ``model.onnx``,
``model.onnx.data``, ``genai_config.json``, tokenizer files) lists every
file with its path, sha256 and size; the release signature covers the list
(:mod:`protocol.variant_files`). On the device:

- :func:`download_folder` fetches each listed file from
  ``<artifact base>/<variant.artifact>/<file.path>`` into
  ``<partial folder>/<file.path>`` with
  :func:`~agent.update.fetcher.download_artifact`, so each file gets the
  same ``Range`` resume, size cap, throughput floor and streaming sha256 as
  a single-file variant; progress is reported over the whole folder.
  Where a file lands depends only on the signed list, never on the server:
  a redirect changes where bytes come from, not where they go, and those
  bytes must still hash to the listed sha256.
- :func:`check_folder` is the whole-folder check: exactly the listed files,
  nothing extra (no unlisted file, no symlink, no other kind of entry),
  each of its listed size and, when asked, sha256. The store runs it before
  a folder is installed and whenever it re-verifies an installed version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from protocol import VariantFile

from ..errors import HashMismatch, SizeMismatch

__all__ = [
    "FolderMismatch", "check_folder", "download_folder", "file_url", "held_bytes",
    "remove_partial",
]

_CHUNK = 1 << 20


class FolderMismatch(HashMismatch):
    """A folder's entries are not exactly its signed file list (a file added, dropped, renamed)."""


def file_url(folder_url: str, path: str) -> str:
    """Where one file of a folder variant is fetched: ``<folder_url>/<path>``.

    ``path`` passed :func:`protocol.variant_files.check_relative_path`: its
    segments need no quoting and cannot step out of the folder.
    """
    return f"{folder_url.rstrip('/')}/{path}"


def held_bytes(path: Path) -> int:
    """Bytes a partial download or an installed artifact holds: a file's size or a folder's sum."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(mode):
        return os.lstat(path).st_size
    if not stat.S_ISDIR(mode):
        return 0
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            entry = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(entry.st_mode):
                total += entry.st_size
    return total


def remove_partial(path: Path) -> None:
    """Delete a partial download, a file or a folder; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _entries(folder: Path) -> dict[str, os.stat_result]:
    """Every entry under ``folder`` by its ``/``-separated relative path (symlinks not followed)."""
    found: dict[str, os.stat_result] = {}
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for name in (*dirs, *names):
            rel = (rel_root / name).as_posix()
            found[rel] = os.lstat(os.path.join(root, name))
    return found


def _folders_of(files: Iterable[VariantFile]) -> set[str]:
    """Every folder the listed paths need (``a/b/c`` needs ``a`` and ``a/b``)."""
    folders = set()
    for f in files:
        parts = f.path.split("/")[:-1]
        folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return folders


def check_folder(folder: Path, files: Sequence[VariantFile], *, hashes: bool) -> None:
    """Raise unless ``folder`` holds exactly ``files``, each of its size (and sha256 if ``hashes``).

    Raises :class:`FolderMismatch` for an unlisted, missing or wrong-kind
    entry (a symlink counts as wrong: the model must not read outside its
    folder), :class:`SizeMismatch` or :class:`HashMismatch` for a listed
    file with other bytes. ``hashes=False`` is for a folder whose files were
    each just hashed as they arrived.
    """
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise FolderMismatch(f"{folder} is not a folder")
    except FileNotFoundError as exc:
        raise FolderMismatch(f"{folder} is missing") from exc
    found = _entries(folder)
    listed = {f.path: f for f in files}
    folders = _folders_of(files)
    extra = sorted(set(found) - set(listed) - folders)
    if extra:
        raise FolderMismatch(f"{folder} holds unlisted {', '.join(extra[:5])}")
    missing = sorted(set(listed) - set(found))
    if missing:
        raise FolderMismatch(f"{folder} lacks listed {', '.join(missing[:5])}")
    for rel in folders:
        if not stat.S_ISDIR(found[rel].st_mode):
            raise FolderMismatch(f"{folder}/{rel} is not a folder")
    for rel, f in sorted(listed.items()):
        st = found[rel]
        if not stat.S_ISREG(st.st_mode):
            raise FolderMismatch(f"{folder}/{rel} is not a regular file")
        if st.st_size != f.size_bytes:
            raise SizeMismatch(f"{folder}/{rel} is {st.st_size} bytes, listed {f.size_bytes}")
        if hashes:
            actual = _sha256(folder / rel)
            if actual != f.sha256:
                raise HashMismatch(f"{folder}/{rel}: sha256 {actual}, listed {f.sha256}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0, opener=_no_follow) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _make_folders(dest: Path, files: Iterable[VariantFile]) -> None:
    """Create ``dest`` and the folders the listed paths need, refusing any symlink among them."""
    for rel in ("", *sorted(_folders_of(files), key=len)):
        path = dest / rel if rel else dest
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            os.mkdir(path, 0o700)
            continue
        if not stat.S_ISDIR(mode):
            raise FolderMismatch(f"{path} is in the way of the folder being downloaded")


def _drop_unlisted(dest: Path, files: Sequence[VariantFile]) -> None:
    """Delete what an earlier attempt left in ``dest`` that the list does not name."""
    listed, folders = {f.path for f in files}, _folders_of(files)
    # Deepest first, so a folder's entries go before it does.
    for rel, st in sorted(_entries(dest).items(), key=lambda item: -len(item[0])):
        if (rel in listed and stat.S_ISREG(st.st_mode)) or (
                rel in folders and stat.S_ISDIR(st.st_mode)):
            continue
        remove_partial(dest / rel)


def download_folder(
    download: Callable[..., Path],
    folder_url: str,
    dest: Path,
    files: Sequence[VariantFile],
    *,
    progress: Callable[[int, int], None] | None = None,
    verified: set[str] | None = None,
    **limits: object,
) -> Path:
    """Fetch every file of a folder variant into ``dest``, then check the folder whole.

    ``download(url, partial, expected_size=, expected_sha256=, progress=,
    **limits)`` fetches one file (normally
    :func:`~agent.update.fetcher.download_artifact` bound to a fetcher), so
    resume, caps, the throughput floor, ``cancel`` and ``pace`` are its.
    Files are fetched in list order; ``progress(done, total)`` counts the
    whole folder. ``verified`` collects the paths already downloaded and
    hashed in this process, which a later attempt skips instead of hashing
    them again. Leftovers of an earlier attempt that the list does not name
    are deleted first.

    Returns ``dest``; raises what ``download`` raises (the file it was on
    deleted for bad bytes, the others kept to resume) or
    :class:`FolderMismatch`.
    """
    verified = set() if verified is None else verified
    total = sum(f.size_bytes for f in files)
    if dest.is_dir() and not dest.is_symlink():
        _drop_unlisted(dest, files)
    _make_folders(dest, files)
    base = 0
    for f in files:
        if f.path not in verified:

            def file_progress(done: int, _size: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + done, total)

            download(file_url(folder_url, f.path), dest / f.path, expected_size=f.size_bytes,
                     expected_sha256=f.sha256, progress=file_progress, **limits)
            verified.add(f.path)
        base += f.size_bytes
    if progress is not None:
        progress(total, total)
    check_folder(dest, files, hashes=False)
    return dest
