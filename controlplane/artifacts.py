"""The artifact store: each file kept once, by its sha256, verified before anyone can see it.

Layout under ``root``::

    blobs/sha256/<hex>      one file per distinct content, named by its digest
    .incoming/<random>.part uploads in progress

An upload streams into a temp file under ``.incoming/`` while its sha256 and
size are computed; only when the digest (and the size, when declared)
matches what the uploader claimed is the file fsynced and hard-linked to
``blobs/sha256/<hex>`` (``os.link`` never replaces an existing file, so two
racing uploads of the same content cannot clobber each other: the second
finds the first's identical blob), and the directory fsynced. A reader
therefore finds either no blob or the whole verified blob, never a partial
one.

The paths agents fetch (``Variant.artifact``, a folder variant's
``<artifact>/<file.path>``, an eval set's ``artifact``) are names in an
index the registry keeps (:mod:`controlplane.artifact_index`), each
resolving to one digest for good. Files an earlier layout stored at their
path under ``root`` are moved into ``blobs/`` by :meth:`ArtifactStore.open`,
once: link first, unlink second, so a crash in between only repeats the
move.

Paths follow the release manifest's rule for ``Variant.artifact`` (relative,
``[A-Za-z0-9._-]`` segments, no ``.`` or ``..``) and, in addition, no
segment may start with ``.``: hidden names are the store's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: longest stored path: a folder variant's ``artifact`` (256) + ``/`` + a file path (200)
MAX_PATH_LEN = 512
MAX_DEPTH = 32
READ_CHUNK = 1 << 20
_INCOMING = ".incoming"
_BLOBS = ("blobs", "sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class ArtifactError(Exception):
    """Base of the store's refusals; ``reason`` is a short machine label."""

    reason = "artifact_error"


class BadArtifactPath(ArtifactError):
    """The path is not a safe relative artifact path."""

    reason = "bad_path"


class BadDigest(ArtifactError):
    """Not a lower-case sha256 hex digest."""

    reason = "bad_digest"


class ArtifactTooLarge(ArtifactError):
    """The upload is larger than the store accepts."""

    reason = "too_large"


class DigestMismatch(ArtifactError):
    """The uploaded bytes do not hash to the declared sha256 (or are not the declared size)."""

    reason = "digest_mismatch"


class ArtifactConflict(ArtifactError):
    """A different blob is already recorded at this path."""

    reason = "conflict"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A verified file: the path it is known by and the blob it resolves to."""

    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob on disk: its digest, size and when it last landed or was asked for."""

    sha256: str
    size_bytes: int
    mtime: float


def check_path(path: str) -> str:
    """``path`` unchanged if it is a safe artifact path; :class:`BadArtifactPath` if not."""
    segments = path.split("/")
    if not path or len(path) > MAX_PATH_LEN or len(segments) > MAX_DEPTH:
        raise BadArtifactPath(f"artifact path must be 1-{MAX_PATH_LEN} characters, "
                              f"at most {MAX_DEPTH} segments")
    for segment in segments:
        # The same rule the agent applies to Variant.artifact, plus no leading
        # dot: '.incoming' and other hidden names belong to the store.
        if not segment or segment.startswith(".") or not set(segment) <= _SEGMENT_CHARS:
            raise BadArtifactPath(
                f"artifact path {path!r}: segments are [A-Za-z0-9._-] and may not start with '.'"
            )
    return path


def check_digest(sha256: str) -> str:
    """``sha256`` unchanged if it is a lower-case hex sha256; :class:`BadDigest` if not."""
    if not _SHA256.fullmatch(sha256):
        raise BadDigest(f"{sha256[:80]!r} is not a sha256 hex digest (64 of [0-9a-f])")
    return sha256


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class Upload:
    """One upload in progress: feed it with :meth:`write`, then :meth:`commit` or :meth:`abort`."""

    def __init__(self, store: ArtifactStore, expected_sha256: str,
                 expected_size: int | None = None) -> None:
        self._store = store
        self._expected = check_digest(expected_sha256)
        self._expected_size = expected_size
        self._digest = hashlib.sha256()
        self.size = 0
        self._tmp = store.incoming / f"{secrets.token_hex(8)}.part"
        self._fh: BinaryIO | None = self._tmp.open("xb")

    def write(self, data: bytes) -> None:
        """Append ``data``; :class:`ArtifactTooLarge` past the store's cap (upload aborted)."""
        if self._fh is None:
            raise RuntimeError("upload already finished")
        self.size += len(data)
        if self.size > self._store.max_bytes:
            self.abort()
            raise ArtifactTooLarge(f"upload exceeds {self._store.max_bytes} bytes")
        self._digest.update(data)
        self._fh.write(data)

    def commit(self) -> tuple[Blob, bool]:
        """Verify and publish the blob; return it and whether it was newly stored.

        Raises :class:`DigestMismatch` (nothing stored).
        """
        if self._fh is None:
            raise RuntimeError("upload already finished")
        sha256 = self._digest.hexdigest()
        if sha256 != self._expected:
            self.abort()
            raise DigestMismatch(f"uploaded bytes hash to {sha256}, not the declared "
                                 f"{self._expected}; nothing was stored")
        if self._expected_size is not None and self.size != self._expected_size:
            self.abort()
            raise DigestMismatch(f"uploaded {self.size} bytes, {self._expected_size} declared")
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        try:
            created = self._store._place(self._tmp, sha256)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
        return Blob(sha256, self.size, time.time()), created

    def abort(self) -> None:
        """Drop the partial file. Idempotent."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class ArtifactStore:
    """Verified blobs under ``root``, at most ``max_bytes`` each."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.incoming = root / _INCOMING
        self.blobs = root.joinpath(*_BLOBS)

    def open(self) -> ArtifactStore:
        """Create the directories, clear uploads a crash left behind, adopt old-layout files."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
        for legacy in list(self._legacy_files()):
            self._adopt(legacy)
        return self

    def blob_path(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives on disk (checked; it may not exist)."""
        return self.blobs / check_digest(sha256)

    def has(self, sha256: str, size_bytes: int | None = None) -> bool:
        """Whether the blob is stored (with that size, when given)."""
        try:
            found = self.blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return False
        return size_bytes is None or found == size_bytes

    def touch(self, sha256: str) -> None:
        """Restart the blob's grace period: a publisher was just told it need not upload it."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.blob_path(sha256))

    def begin(self, expected_sha256: str, expected_size: int | None = None) -> Upload:
        """Start an upload that must hash to ``expected_sha256`` (and be ``expected_size``)."""
        return Upload(self, expected_sha256, expected_size)

    def iter_blobs(self) -> Iterator[Blob]:
        """Every stored blob (names that are not digests are not the store's and are skipped)."""
        with os.scandir(self.blobs) as entries:
            for entry in entries:
                if _SHA256.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    yield Blob(entry.name, stat.st_size, stat.st_mtime)

    def remove(self, sha256: str) -> bool:
        """Delete a blob; False when it was already gone."""
        try:
            self.blob_path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def _place(self, tmp: Path, sha256: str) -> bool:
        final = self.blob_path(sha256)
        try:
            # A hard link publishes the fully written file in one step and,
            # unlike rename, refuses to replace what is already there. What is
            # there has the same name, hence (verified on its way in) the same bytes.
            os.link(tmp, final)
        except FileExistsError:
            os.utime(final)
            return False
        _fsync_dir(final.parent)
        return True

    def _legacy_files(self) -> Iterator[Path]:
        """Regular files an earlier layout stored at their artifact path."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            # Pruned before os.walk lists them: a large store starts without
            # reading its blob directory.
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != _INCOMING]
            if here == self.blobs.parent:
                dirnames[:] = [d for d in dirnames if d != self.blobs.name]
            for name in filenames:
                yield here / name

    def _adopt(self, legacy: Path) -> None:
        if legacy.is_symlink() or not legacy.is_file():
            return
        sha256, _ = hash_file(legacy)
        final = self.blob_path(sha256)
        # Link, then unlink: a crash between the two leaves both names, and the
        # next start finds the old one again, sees the blob and only unlinks.
        with contextlib.suppress(FileExistsError):
            os.link(legacy, final)
            _fsync_dir(final.parent)
        legacy.unlink()
        parent = legacy.parent
        while parent != self.root and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
