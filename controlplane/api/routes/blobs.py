"""``/v1/blobs``: the store's blobs by sha256, for publishers.

``POST /v1/blobs/missing`` answers which of a list of digests the store
lacks, so ``slmfleet models publish`` uploads only those; every digest it
holds has its garbage-collection grace period restarted, so it is still
there when the release that lists it is registered. ``PUT
/v1/blobs/sha256/{hex}`` streams one blob in, kept only if it hashes to the
digest in its path. ``POST /v1/blobs/gc`` (admin) removes the blobs no
registered release refers to (controlplane/blob_gc.py).

Agents never come here: they fetch by path from ``/v1/artifacts``.
"""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Path, Request, Response

from controlplane.api.blob_transfer import path_cache, receive, refuse, store_of
from controlplane.api.deps import ContextDep, described
from controlplane.api.schemas_blobs import BlobOut, CollectIn, CollectOut, MissingIn, MissingOut
from controlplane.artifacts import ArtifactError, ArtifactTooLarge, BadDigest, check_digest
from controlplane.blob_gc import collect

router = APIRouter(prefix="/v1/blobs", tags=["artifacts"])

#: a blob's name: its sha256, lower-case hex
Digest = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256, lower-case hex")]


@router.post("/missing", response_model=MissingOut)
def post_missing(body: MissingIn, context: ContextDep) -> MissingOut:
    """Which of ``digests`` the store lacks."""
    store = store_of(context)
    missing = []
    for sha256 in dict.fromkeys(body.digests):
        if store.has(sha256):
            store.touch(sha256)
        else:
            missing.append(sha256)
    return MissingOut(missing=missing)


@router.put(
    "/sha256/{sha256}",
    response_model=BlobOut,
    status_code=201,
    responses=described({
        200: ("the store already held this blob", BlobOut),
        413: "larger than artifact_max_bytes",
        422: "the body does not hash to the digest (nothing stored)",
    }),
)
async def put_blob(sha256: Digest, request: Request, response: Response,
                   context: ContextDep) -> BlobOut:
    """Store the request body as the blob ``sha256`` once it hashes to that digest."""
    store = store_of(context)
    raw = request.headers.get("content-length", "")
    declared = int(raw) if raw.isdigit() else None
    try:
        check_digest(sha256)
        if declared is not None and declared > store.max_bytes:
            raise ArtifactTooLarge(f"{declared} bytes exceeds {store.max_bytes}")
        if declared is not None and store.has(sha256, declared):
            # Same content already here: nothing to read, nothing to write.
            store.touch(sha256)
            response.status_code = 200
            return BlobOut(sha256=sha256, size_bytes=declared)
        blob = await receive(request, store, sha256, declared)
    except ArtifactError as exc:
        raise refuse(exc) from exc
    return BlobOut(sha256=blob.sha256, size_bytes=blob.size_bytes)


@router.head("/sha256/{sha256}", responses=described({404: "the store does not hold this blob"}))
def head_blob(sha256: Digest, context: ContextDep) -> Response:
    """Whether the store holds the blob; ``Content-Length`` is its size."""
    store = store_of(context)
    try:
        size = store.blob_path(sha256).stat().st_size
    except (BadDigest, FileNotFoundError) as exc:
        raise HTTPException(404, detail=f"blob {sha256[:80]!r} not found") from exc
    return Response(headers={"Content-Length": str(size)})


@router.post("/gc", response_model=CollectOut)
async def post_gc(body: CollectIn, request: Request, context: ContextDep) -> CollectOut:
    """Remove the blobs no registered release refers to (admin); ``dry_run`` only reports."""
    store = store_of(context)

    def run() -> CollectOut:
        with context.sessions() as session:
            done = collect(session, store, dry_run=body.dry_run, grace_s=body.grace_s)
        if not done.dry_run:
            path_cache(request, context).forget(set(done.removed_paths))
        return CollectOut(**done.as_dict())

    return await to_thread.run_sync(run)
