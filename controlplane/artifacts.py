"""The artifact store: model files on local disk, verified before anyone can see them.

An upload streams into a temp file under ``<root>/.incoming/`` while its
sha256 and size are computed; only when the digest matches what the
uploader declared is the file fsynced and hard-linked into place
(``os.link`` never replaces an existing file, so two racing uploads cannot
clobber each other), and the directory fsynced. A reader therefore finds
either no file or the whole verified file at a path, never a partial one.
Content at a path never changes once stored: a different blob for the same
path is a conflict.

Paths follow the release manifest's rule for ``Variant.artifact`` (relative,
``[A-Za-z0-9._-]`` segments, no ``.`` or ``..``) and, in addition, no
segment may start with ``.``: hidden names are the store's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: longest stored path, as ``Variant.artifact``
MAX_PATH_LEN = 256
MAX_DEPTH = 16
READ_CHUNK = 1 << 20
_INCOMING = ".incoming"
_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class ArtifactError(Exception):
    """Base of the store's refusals; ``reason`` is a short machine label."""

    reason = "artifact_error"


class BadArtifactPath(ArtifactError):
    """The path is not a safe relative artifact path."""

    reason = "bad_path"


class ArtifactTooLarge(ArtifactError):
    """The upload is larger than the store accepts."""

    reason = "too_large"


class DigestMismatch(ArtifactError):
    """The uploaded bytes do not hash to the declared sha256."""

    reason = "digest_mismatch"


class ArtifactConflict(ArtifactError):
    """A different blob is already stored at this path."""

    reason = "conflict"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A verified file in the store."""

    path: str
    sha256: str
    size_bytes: int


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

    def __init__(self, store: ArtifactStore, path: str, expected_sha256: str) -> None:
        self._store = store
        self.path = path
        self._expected = expected_sha256
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

    def commit(self) -> tuple[StoredFile, bool]:
        """Verify and publish the file; return it and whether it was newly stored.

        Raises :class:`DigestMismatch` (nothing stored) or
        :class:`ArtifactConflict` when another blob holds the path.
        """
        if self._fh is None:
            raise RuntimeError("upload already finished")
        sha256 = self._digest.hexdigest()
        if sha256 != self._expected:
            self.abort()
            raise DigestMismatch(
                f"uploaded bytes hash to {sha256}, X-Content-SHA256 said {self._expected}"
            )
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        stored = StoredFile(self.path, sha256, self.size)
        try:
            return stored, self._store._place(self._tmp, stored)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()

    def abort(self) -> None:
        """Drop the partial file. Idempotent."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class ArtifactStore:
    """Verified files under ``root``, at most ``max_bytes`` each."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.incoming = root / _INCOMING

    def open(self) -> ArtifactStore:
        """Create the directories and clear uploads a crash left behind."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
        return self

    def file_for(self, path: str) -> Path:
        """Where ``path`` lives on disk (checked; it may not exist)."""
        return self.root / check_path(path)

    def begin(self, path: str, expected_sha256: str) -> Upload:
        """Start an upload to ``path`` that must hash to ``expected_sha256``."""
        return Upload(self, check_path(path), expected_sha256)

    def _place(self, tmp: Path, stored: StoredFile) -> bool:
        final = self.file_for(stored.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            # A hard link publishes the fully written file in one step and,
            # unlike rename, refuses to replace what is already there.
            os.link(tmp, final)
        except FileExistsError:
            existing_sha, existing_size = hash_file(final)
            if (existing_sha, existing_size) != (stored.sha256, stored.size_bytes):
                raise ArtifactConflict(
                    f"{stored.path} already holds a different blob (sha256 {existing_sha})"
                ) from None
            return False
        _fsync_dir(final.parent)
        return True
