"""The artifact index: the paths agents fetch, each resolved for good to one blob.

A path (``Variant.artifact``, a folder variant's ``<artifact>/<file.path>``,
an eval set's ``artifact``) is recorded once with the sha256 and size of its
content and never changes after: a different blob for a recorded path is a
conflict. That is what lets downloads be cached for good and resolutions be
kept in memory (:class:`PathCache`) instead of asking the database on every
request.

Registering a release (controlplane/registry.py) records every path it
refers to (when its blob is stored) and lists them in ``release_files``;
garbage collection keeps every blob listed there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from protocol import ReleaseManifest

from .artifacts import StoredFile
from .db.models import Artifact

#: resolutions kept in memory; a path's resolution never changes once recorded
CACHE_SIZE = 4096


class PathConflict(Exception):
    """The path is recorded with a different blob."""

    reason = "conflict"


def release_files(manifest: ReleaseManifest) -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) of every file a release refers to.

    Raises :class:`PathConflict` when the release names one path twice with
    different content (one of the two would be served to the wrong devices).
    """
    named: list[tuple[str, str, int]] = []
    for variant in manifest.variants.values():
        if variant.files:
            named += [(f"{variant.artifact}/{f.path}", f.sha256, f.size_bytes)
                      for f in variant.files]
        else:
            named.append((variant.artifact, variant.sha256, variant.size_bytes))
    if manifest.eval_set is not None:
        ref = manifest.eval_set
        named.append((ref.artifact, ref.sha256, ref.size_bytes))
    out: dict[str, tuple[str, int]] = {}
    for path, sha256, size in named:
        if out.setdefault(path, (sha256, size)) != (sha256, size):
            raise PathConflict(f"the release names {path!r} twice, with different content")
    return out


def record_path(session: Session, stored: StoredFile, *, now: float | None = None) -> bool:
    """Record that ``stored.path`` resolves to its blob; True if the record is new. Commits.

    Raises :class:`PathConflict` when the path already resolves to another blob.
    """
    row = session.get(Artifact, stored.path)
    if row is not None:
        if (row.sha256, row.size_bytes) != (stored.sha256, stored.size_bytes):
            raise PathConflict(f"{stored.path} is recorded with sha256 {row.sha256}, "
                               f"{row.size_bytes} bytes")
        return False
    session.add(Artifact(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes,
                         stored_at=time.time() if now is None else now))
    try:
        session.commit()
    except IntegrityError:
        # Another request recorded the same path first: agree or conflict.
        session.rollback()
        return record_path(session, stored, now=now)
    return True


class PathCache:
    """Path -> (sha256, size), filled from the index on a miss; thread-safe, bounded.

    Only found paths are kept: a path not yet recorded may be recorded by
    the next upload, a recorded one never changes.
    """

    def __init__(self, lookup: Callable[[str], tuple[str, int] | None],
                 size: int = CACHE_SIZE) -> None:
        self._lookup = lookup
        self._size = size
        self._entries: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, path: str) -> tuple[str, int] | None:
        """The blob ``path`` names, or None when the path is not recorded."""
        with self._lock:
            hit = self._entries.get(path)
            if hit is not None:
                self._entries.move_to_end(path)
                return hit
        found = self._lookup(path)
        if found is not None:
            with self._lock:
                self._entries[path] = found
                if len(self._entries) > self._size:
                    self._entries.popitem(last=False)
        return found

    def forget(self, paths: set[str]) -> None:
        """Drop ``paths`` (garbage collection removed their records)."""
        with self._lock:
            for path in paths:
                self._entries.pop(path, None)
