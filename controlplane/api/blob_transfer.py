"""What ``/v1/blobs`` and ``/v1/artifacts`` share: receiving an upload into the blob
store, its refusals as HTTP answers, and the app's cache of resolved paths.

The body streams to a temp file in gathered chunks, each written and hashed
on a worker thread so the event loop stays free for downloads; the blob is
published only once its digest (and size, when declared) match.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import HTTPException, Request

from controlplane.api.deps import not_configured
from controlplane.artifact_index import PathCache
from controlplane.artifacts import (
    ArtifactConflict,
    ArtifactError,
    ArtifactStore,
    ArtifactTooLarge,
    BadArtifactPath,
    BadDigest,
    Blob,
    DigestMismatch,
)
from controlplane.context import AppContext
from controlplane.db.models import Artifact

#: bytes gathered before one trip to the worker thread that writes them
WRITE_CHUNK = 1 << 20

_STATUS = {
    BadArtifactPath: 422,
    BadDigest: 422,
    ArtifactTooLarge: 413,
    DigestMismatch: 422,
    ArtifactConflict: 409,
}


def store_of(context: AppContext) -> ArtifactStore:
    """The configured store, or 503 naming the setting."""
    if context.artifacts is None:
        raise not_configured("the artifact store is not configured (artifacts_dir)")
    return context.artifacts


def path_cache(request: Request, context: AppContext) -> PathCache:
    """The app's resolutions of artifact paths to blobs, made on first use."""
    cache = getattr(request.app.state, "artifact_paths", None)
    if cache is None:
        def lookup(path: str) -> tuple[str, int] | None:
            # A session of its own, closed before the body streams: a request-scoped
            # one would stay checked out of the pool for the whole download.
            with context.sessions() as session:
                row = session.get(Artifact, path)
                return None if row is None else (row.sha256, row.size_bytes)

        cache = request.app.state.artifact_paths = PathCache(lookup)
    return cache


def refuse(exc: ArtifactError) -> HTTPException:
    """The HTTP answer to a store refusal: its status, ``reason`` and message."""
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
    return HTTPException(status, detail={"reason": exc.reason, "message": str(exc)})


async def receive(request: Request, store: ArtifactStore, sha256: str,
                  size_bytes: int | None = None) -> Blob:
    """Stream the request body into the store as the blob ``sha256``.

    Raises the store's :class:`ArtifactError` refusals; nothing is kept then.
    """
    upload = store.begin(sha256, size_bytes)
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= WRITE_CHUNK:
                data, pending = bytes(pending), bytearray()
                await to_thread.run_sync(upload.write, data)
        if pending:
            await to_thread.run_sync(upload.write, bytes(pending))
        blob, _ = await to_thread.run_sync(upload.commit)
        return blob
    finally:
        upload.abort()
