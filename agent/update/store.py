"""Versioned model store with an atomically swapped ``active`` pointer.

Layout under ``root`` (one filesystem, so every rename below is atomic)::

    versions/<key>/              one installed version; never modified once here
        model                    the artifact (read-only): a file, or for a
                                 folder variant a folder of its listed files
        manifest.json            the manifest it was installed with
    staging/
        <key>.partial            a download in progress (staging_path): a
                                 file, or a folder for a folder variant
        .build-<key>-<rand>/     a version being assembled by install()
        .trash-<key>-<rand>/     a version being deleted by gc()
    active -> versions/<key>     relative symlinks, replaced atomically
    previous -> versions/<key>   what rollback() returns to

A key is ``<name>@<version>-<tier>`` (:func:`model_key`).

Crash safety
------------

Invariant: every directory under ``versions/`` is complete (artifact and
manifest written and fsynced), and ``active`` / ``previous``, when present,
point into ``versions/``. So after a SIGKILL or power loss between any two
syscalls, ``active()`` is a complete version or ``None`` if nothing was ever
activated. Why each method keeps it:

- ``install``: the version is assembled in a build directory under
  ``staging/`` (artifact renamed in and fsynced -- a folder checked to
  hold exactly its listed files, then every file and folder in it
  fsynced --, manifest written
  atomically, build directory fsynced) and only then renamed into
  ``versions/`` in one step, followed by an fsync of ``versions/``. A crash
  before that rename leaves garbage in ``staging/`` only (and costs a
  re-download); after it, the version is whole. Data is fsynced before the
  rename, so power loss cannot persist the rename without the data.
- ``activate``: ``previous`` is pointed at the current version first, then
  ``active`` at the new one, each with :func:`replace_symlink_atomic`
  (temporary link renamed over the old one, directory fsynced). A crash
  between the two leaves both pointing at the old version, which is whole.
- ``rollback``: ``active`` is swapped to ``previous`` (one atomic rename),
  then ``previous`` is removed. A crash between leaves both on the old
  version.
- ``gc``: a version neither pointer names is first renamed out of
  ``versions/`` into ``staging/`` (atomic, fsynced), then deleted. A
  half-deleted directory under ``versions/`` would look installed and could
  later be activated; in ``staging/`` it is just garbage.
- ``deactivate`` (the name left the desired set): ``previous`` is pointed
  at the active version, then ``active`` is removed. A crash between leaves
  ``active`` as it was, and the step is simply run again.
- ``clean_staging``: deletes only what lives in ``staging/`` and stray
  temporary links in ``root``; nothing a pointer can name.

The store is not safe for concurrent writers: the agent's update pipeline is
the one writer.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.atomic import (
    fsync_dir,
    read_json,
    remove_stale_temps,
    replace_symlink_atomic,
    write_json_atomic,
)
from agent.errors import ArtifactError, StoreError
from protocol import VariantFile, check_file_list

from .folder import check_folder, remove_partial

__all__ = ["ModelStore", "ModelVersion", "model_key"]

ARTIFACT = "model"
MANIFEST = "manifest.json"
_ACTIVE, _PREVIOUS = "active", "previous"
_PARTIAL = ".partial"
_BUILD, _TRASH = ".build-", ".trash-"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def model_key(name: str, version: str, tier: str) -> str:
    """The store key ``<name>@<version>-<tier>``; ``ValueError`` if unusable as a directory name."""
    key = f"{name}@{version}-{tier}"
    _check_key(key)
    return key


def _check_key(key: str) -> None:
    # A key becomes a path component: no separators, no "..", no leading dot
    # (which would also collide with the store's own temporary names).
    if not isinstance(key, str) or not _KEY.fullmatch(key) or ".." in key:
        raise ValueError(f"invalid model key {key!r}")


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One installed model version."""

    key: str
    dir: Path
    artifact: Path
    manifest: dict[str, Any]


class ModelStore:
    """Installed model versions under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._versions = self.root / "versions"
        self._staging = self.root / "staging"
        created = False
        for d in (self.root, self._versions, self._staging):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                created = True
        if created:
            # The subdirectories must exist on disk before anything names them.
            fsync_dir(self.root)

    # -- queries -----------------------------------------------------------

    def staging_path(self, key: str) -> Path:
        """Where to download ``key``'s artifact before :meth:`install` (same filesystem)."""
        _check_key(key)
        return self._staging / f"{key}{_PARTIAL}"

    def active(self) -> ModelVersion | None:
        """The active version, or ``None`` if nothing was ever activated."""
        return self._pointed(_ACTIVE)

    def previous(self) -> ModelVersion | None:
        """The version :meth:`rollback` would return to, if any."""
        return self._pointed(_PREVIOUS)

    def version(self, key: str) -> ModelVersion | None:
        """The installed version ``key``, or ``None`` if it is not installed."""
        _check_key(key)
        directory = self._versions / key
        if not directory.is_dir():
            return None
        try:
            manifest = read_json(directory / MANIFEST)
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
        artifact = directory / ARTIFACT
        is_folder = isinstance(manifest, dict) and manifest.get("files") is not None
        present = artifact.is_dir() if is_folder else artifact.is_file()
        if not isinstance(manifest, dict) or artifact.is_symlink() or not present:
            raise StoreError(f"{directory} is incomplete: manifest or artifact missing")
        return ModelVersion(key, directory, directory / ARTIFACT, manifest)

    def installed(self) -> list[str]:
        """Keys of all installed versions, oldest install first."""
        entries = []
        for entry in self._versions.iterdir():
            if _KEY.fullmatch(entry.name) and ".." not in entry.name:
                try:
                    entries.append((entry.stat().st_mtime_ns, entry.name))
                except FileNotFoundError:
                    continue  # renamed away by gc() since the listing: not installed
        return [name for _, name in sorted(entries)]

    def verify_hash(self, key: str) -> bool:
        """Re-hash ``key``'s artifact against its manifest: is the version intact?

        Reads the whole artifact; meant for start-up after a crash, to prove
        the active model survived before serving it.
        """
        try:
            version = self.version(key)
        except StoreError:
            return False
        if version is None:
            return False
        expected_sha256, expected_size = _artifact_digest(version.manifest)
        try:
            files = manifest_files(version.manifest)
            if files is not None:
                check_folder(version.artifact, files, hashes=True)
                return True
        except (ValueError, ArtifactError, OSError):
            return False
        digest = hashlib.sha256()
        try:
            with version.artifact.open("rb") as f:
                if os.fstat(f.fileno()).st_size != expected_size:
                    return False
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return False
        return digest.hexdigest() == expected_sha256

    # -- changes -------------------------------------------------------------

    def install(self, key: str, verified_file: Path, manifest: dict[str, Any]) -> Path:
        """Move a verified artifact into ``versions/key`` with its manifest; returns the directory.

        ``verified_file`` must be on the store's filesystem (normally
        :meth:`staging_path`) and is consumed. ``manifest`` must carry the
        artifact's ``sha256`` and ``size``, which :meth:`verify_hash` checks
        later. Installing a key again with the same sha256 is a no-op.

        A folder variant's ``verified_file`` is its verified partial folder
        and ``manifest["files"]`` its file list (``sha256`` then the list's
        digest): the folder must hold exactly those files, of those sizes
        (:func:`~agent.update.folder.check_folder` raises otherwise), and
        moves in whole, as one rename.
        """
        _check_key(key)
        sha256, size = _artifact_digest(manifest)
        files = manifest_files(manifest)
        verified_file = Path(verified_file)
        final = self._versions / key
        existing = self.version(key)
        if existing is not None:
            if _artifact_digest(existing.manifest)[0] != sha256:
                raise ValueError(f"{key} is already installed with a different sha256")
            remove_partial(verified_file)
            return final
        if files is not None:
            check_folder(verified_file, files, hashes=False)
        elif verified_file.stat().st_size != size:
            raise ValueError(f"{verified_file} is not {size} bytes as the manifest says")

        build = Path(tempfile.mkdtemp(prefix=f"{_BUILD}{key}-", dir=self._staging))
        artifact = build / ARTIFACT
        os.rename(verified_file, artifact)
        if files is not None:
            _seal_folder(artifact)
        else:
            os.chmod(artifact, 0o444)  # nothing writes a model in place
            _fsync_file(artifact)  # not trusting every caller to have done it
        write_json_atomic(build / MANIFEST, manifest, mode=0o444)  # also fsyncs build/
        os.chmod(build, 0o755)
        # The one step that makes the version exist; all its data is on disk.
        os.rename(build, final)
        fsync_dir(self._versions)
        fsync_dir(self._staging)
        return final

    def activate(self, key: str) -> ModelVersion:
        """Make ``key`` the active version; the one it replaces becomes ``previous``."""
        version = self.version(key)
        if version is None:
            raise ValueError(f"{key} is not installed")
        current = self._link_key(_ACTIVE)
        if current == key:
            return version
        if current is not None:
            # previous first: a crash before the next line leaves both on `current`.
            replace_symlink_atomic(self.root / _PREVIOUS, f"versions/{current}")
        replace_symlink_atomic(self.root / _ACTIVE, f"versions/{key}")
        return version

    def rollback(self) -> ModelVersion:
        """Make ``previous`` active again and return it.

        ``previous`` is removed afterwards: the version rolled back from has
        just failed, so it must not become a rollback target (gc reclaims it),
        and a second rollback raises instead of flipping back to it.
        """
        target = self.previous()
        if target is None:
            raise RuntimeError("no previous version to roll back to")
        if self._link_key(_ACTIVE) != target.key:
            replace_symlink_atomic(self.root / _ACTIVE, f"versions/{target.key}")
        (self.root / _PREVIOUS).unlink()
        fsync_dir(self.root)
        return target

    def deactivate(self) -> ModelVersion | None:
        """Stop naming an active version; it becomes ``previous`` (kept for a rollback).

        Returns the version that was active, None if none was.
        """
        current = self._link_key(_ACTIVE)
        if current is None:
            return None
        version = self.version(current)
        # previous first: a crash before the unlink leaves active as it was.
        replace_symlink_atomic(self.root / _PREVIOUS, f"versions/{current}")
        (self.root / _ACTIVE).unlink()
        fsync_dir(self.root)
        return version

    def gc(self, keep: int = 2, protect: Iterable[str] = ()) -> list[str]:
        """Delete old versions, oldest first, until at most ``keep`` remain; returns their keys.

        ``active``, ``previous`` and the keys in ``protect`` (versions a
        pending update installed and has yet to activate) are never deleted
        (they count towards ``keep``).
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        protected = {self._link_key(_ACTIVE), self._link_key(_PREVIOUS), *protect} - {None}
        keys = self.installed()
        excess = len(keys) - max(keep, len(protected & set(keys)))
        doomed = [k for k in keys if k not in protected][: max(excess, 0)]
        for key in doomed:
            trash = self._staging / f"{_TRASH}{key}-{secrets.token_hex(4)}"
            # Out of versions/ in one step; only then delete it piece by piece.
            os.rename(self._versions / key, trash)
            fsync_dir(self._versions)
            fsync_dir(self._staging)
            shutil.rmtree(trash)
        return doomed

    def clean_staging(self, keep_partials: Iterable[str] = ()) -> list[Path]:
        """Delete everything a crash or an abandoned download left in staging.

        Partial downloads of the keys in ``keep_partials`` are kept so that
        they resume. Call at start-up, before anything is downloaded.
        Returns the paths removed.
        """
        keep = {f"{k}{_PARTIAL}" for k in keep_partials}
        removed = []
        for entry in self._staging.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        if removed:
            fsync_dir(self._staging)
        # A crash inside replace_symlink_atomic leaves a temporary link here.
        removed += remove_stale_temps(self.root)
        return removed

    # -- internals -----------------------------------------------------------

    def _pointed(self, link: str) -> ModelVersion | None:
        key = self._link_key(link)
        if key is None:
            return None
        version = self.version(key)
        if version is None:
            raise StoreError(f"{self.root / link} points to {key}, which is not installed")
        return version

    def _link_key(self, link: str) -> str | None:
        """The key ``root/link`` points to, or ``None`` if the link does not exist."""
        path = self.root / link
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{path} is not a symlink") from exc
        head, _, key = target.partition("/")
        if head != "versions" or not _KEY.fullmatch(key) or ".." in key:
            raise StoreError(f"{path} -> {target!r} is not a version of this store")
        return key


def _artifact_digest(manifest: Any) -> tuple[str, int]:
    """``(sha256, size)`` of the artifact a manifest describes."""
    sha256 = manifest.get("sha256") if isinstance(manifest, dict) else None
    size = manifest.get("size") if isinstance(manifest, dict) else None
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise ValueError("manifest needs the artifact's sha256 as 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("manifest needs the artifact's size as a non-negative int")
    return sha256, size


def manifest_files(manifest: Any) -> list[VariantFile] | None:
    """A stored manifest's file list (a folder variant), or ``None`` for a single file.

    Raises ``ValueError`` when the list is malformed or is not the one the
    manifest's ``sha256`` and ``size`` name.
    """
    raw = manifest.get("files") if isinstance(manifest, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ValueError("manifest files must be a list")
    files = [VariantFile.model_validate(entry) for entry in raw]
    sha256, size = _artifact_digest(manifest)
    check_file_list(files, sha256=sha256, size_bytes=size)
    return files


def _seal_folder(folder: Path) -> None:
    """Make a folder artifact's files read-only and every file and folder in it durable."""
    # Deepest first: a folder's entries are on disk before the folder itself is fsynced.
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            path = Path(root) / name
            os.chmod(path, 0o444)
            _fsync_file(path)
        os.chmod(root, 0o755)
        fsync_dir(root)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
