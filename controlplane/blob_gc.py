"""Garbage collection of the blob store: a blob goes only when nothing can need it.

Kept: every blob a registered release lists (``release_files``), every blob
an index path still resolves to, and every blob younger than the grace
period. The grace period covers the window between a publisher's upload
(or its "which do you lack?" question, which restarts a held blob's clock)
and the release registration that will list it. Index paths no registered
release lists, recorded before the grace period, are dropped first, so the
blob of an upload that was never registered goes too. Uploads in progress
are temp files under ``.incoming/``, never blobs, so no collection can
touch one; if a collection removes a blob at the instant a new upload of
the same digest lands, the upload's own link recreates it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .artifacts import ArtifactStore
from .db.models import Artifact, ReleaseFile

#: a blob or index path this young is kept whatever refers to it
DEFAULT_GRACE_S = 3600.0


@dataclass(frozen=True)
class Collected:
    """What one collection removed (or, dry, would remove) and what it kept."""

    dry_run: bool
    removed_blobs: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    removed_paths: list[str] = field(default_factory=list)
    kept_blobs: int = 0
    kept_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        """The JSON body of ``POST /v1/blobs/gc``."""
        return {
            "dry_run": self.dry_run,
            "removed_blobs": self.removed_blobs,
            "removed_bytes": self.removed_bytes,
            "removed_paths": self.removed_paths,
            "kept_blobs": self.kept_blobs,
            "kept_bytes": self.kept_bytes,
        }


def collect(
    session: Session,
    store: ArtifactStore,
    *,
    dry_run: bool,
    grace_s: float = DEFAULT_GRACE_S,
    now: float | None = None,
) -> Collected:
    """Remove unreferenced blobs and index paths older than ``grace_s``. Commits."""
    now = time.time() if now is None else now
    cutoff = now - grace_s
    listed = set(session.scalars(select(ReleaseFile.path).distinct()))
    stale_paths = sorted(
        row.path for row in session.scalars(select(Artifact).where(Artifact.stored_at < cutoff))
        if row.path not in listed
    )
    if stale_paths and not dry_run:
        session.execute(delete(Artifact).where(Artifact.path.in_(stale_paths)))
        session.commit()
    # Read after the paths are gone: what still resolves, or is listed, stays.
    keep = set(session.scalars(select(ReleaseFile.sha256).distinct()))
    stale = set(stale_paths)
    keep.update(
        sha for path, sha in session.execute(select(Artifact.path, Artifact.sha256))
        if path not in stale
    )
    removed: list[str] = []
    removed_bytes = kept = kept_bytes = 0
    for blob in sorted(store.iter_blobs(), key=lambda b: b.sha256):
        if blob.sha256 in keep or blob.mtime >= cutoff:
            kept += 1
            kept_bytes += blob.size_bytes
            continue
        if dry_run or store.remove(blob.sha256):
            removed.append(blob.sha256)
            removed_bytes += blob.size_bytes
    return Collected(dry_run, removed, removed_bytes, stale_paths, kept, kept_bytes)
