"""Receiving an upload into the blob store, shared by ``/v1/blobs`` and ``/v1/artifacts``.

The body streams to a temp file in gathered chunks, each written and hashed
on a worker thread so the event loop stays free for downloads; the blob is
published only once its digest (and size, when declared) match.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import HTTPException, Request

from controlplane.api.deps import not_configured
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
