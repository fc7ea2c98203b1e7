"""``/v1/artifacts``: upload model files (verified) and serve them with HTTP Range.

``GET``/``HEAD`` answer 200, 206 with ``Content-Range`` for a satisfiable
range, or 416 with ``Content-Range: bytes */N``; ``ETag`` is the quoted
sha256, so ``If-Range`` with it resumes only the same content. Content at a
path never changes, so responses may be cached for good.

``PUT`` streams the body to disk while hashing it; the file becomes visible
only once its sha256 matches ``X-Content-SHA256``.
"""

from __future__ import annotations

import re
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.responses import FileResponse

from controlplane.api.deps import ContextDep, described, not_configured
from controlplane.api.schemas_registry import ArtifactOut
from controlplane.artifacts import (
    ArtifactConflict,
    ArtifactError,
    ArtifactStore,
    ArtifactTooLarge,
    BadArtifactPath,
    DigestMismatch,
    StoredFile,
    Upload,
)
from controlplane.context import AppContext
from controlplane.db.models import Artifact
from controlplane.registry import ArtifactMismatch, get_artifact, record_artifact

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: what ``X-Content-SHA256`` may hold: the hex digest, either case, blanks around it
#: (the route strips and lower-cases it before comparing)
SHA256_HEADER_PATTERN = r"^\s*[0-9a-fA-F]{64}\s*$"
#: bytes gathered before one trip to the worker thread that writes them
WRITE_CHUNK = 1 << 20
#: content at a path never changes (a different blob is a 409), so caches may keep it
IMMUTABLE = "public, max-age=31536000, immutable"

_STATUS = {
    BadArtifactPath: 422,
    ArtifactTooLarge: 413,
    DigestMismatch: 422,
    ArtifactConflict: 409,
}


def _store(context: AppContext) -> ArtifactStore:
    if context.artifacts is None:
        raise not_configured("the artifact store is not configured (artifacts_dir)")
    return context.artifacts


def _refuse(exc: ArtifactError) -> HTTPException:
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
    return HTTPException(status, detail={"reason": exc.reason, "message": str(exc)})


_READ_RESPONSES = described({
    206: "the requested range",
    404: "no such artifact",
    416: "range not satisfiable; Content-Range: bytes */size",
})


@router.head(
    "/{path:path}",
    response_class=FileResponse,
    responses=_READ_RESPONSES,
    operation_id="head_artifact",
)
@router.get(
    "/{path:path}",
    response_class=FileResponse,
    responses=_READ_RESPONSES,
    operation_id="get_artifact",
)
def get_artifact_file(path: str, context: ContextDep) -> Response:
    """The artifact's bytes; honours ``Range`` and ``If-Range``."""
    store = _store(context)
    try:
        file = store.file_for(path)
    except BadArtifactPath as exc:
        raise HTTPException(404, detail=f"artifact {path!r} not found") from exc
    # A session of its own, closed before the body streams: a request-scoped
    # one would stay checked out of the pool for the whole download, and a
    # stage of devices fetching a large model at once would starve the API.
    record = _lookup(context, path)
    if record is None or not file.is_file():
        raise HTTPException(404, detail=f"artifact {path!r} not found")
    return FileResponse(
        file,
        media_type="application/octet-stream",
        headers={"ETag": f'"{record.sha256}"', "Cache-Control": IMMUTABLE},
    )


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length", "")
    # The HTTP server has refused a framing header that is not a number.
    return int(raw) if raw.isdigit() else None


def _lookup(context: AppContext, path: str) -> Artifact | None:
    with context.sessions() as session:
        return get_artifact(session, path)


def _record(context: AppContext, stored: StoredFile) -> tuple[bool, Artifact | None]:
    with context.sessions() as session:
        created = record_artifact(session, stored)
        return created, get_artifact(session, stored.path)


async def _receive(request: Request, upload: Upload) -> None:
    pending = bytearray()
    async for chunk in request.stream():
        pending += chunk
        if len(pending) >= WRITE_CHUNK:
            data, pending = bytes(pending), bytearray()
            # Disk writes and hashing leave the event loop free for downloads.
            await to_thread.run_sync(upload.write, data)
    if pending:
        await to_thread.run_sync(upload.write, bytes(pending))


@router.put(
    "/{path:path}",
    response_model=ArtifactOut,
    status_code=201,
    responses=described({
        200: ("the same blob was already stored", ArtifactOut),
        409: "a different blob is stored at this path",
        413: "larger than artifact_max_bytes",
        422: "bad path, missing or malformed X-Content-SHA256, or sha256 mismatch (nothing stored)",
    }),
)
async def put_artifact(
    path: str,
    request: Request,
    response: Response,
    context: ContextDep,
    x_content_sha256: Annotated[
        str,
        Header(
            description="sha256 (hex) the body must hash to",
            # Documented, checked below: a missing or malformed digest is the
            # route's own 422 (reason missing_digest), not a generic one.
            json_schema_extra={"pattern": SHA256_HEADER_PATTERN},
        ),
    ],
) -> ArtifactOut:
    """Store the request body at ``path`` once it hashes to ``X-Content-SHA256``."""
    store = _store(context)
    # Read from the request, not declared as a parameter: Content-Length frames
    # the body, and a client cannot choose it apart from what it sends.
    content_length = _content_length(request)
    expected = x_content_sha256.strip().lower()
    if not _SHA256.fullmatch(expected):
        raise HTTPException(
            422,
            detail={"reason": "missing_digest", "message": "X-Content-SHA256 must be a sha256 hex"},
        )
    if content_length is not None and content_length > store.max_bytes:
        raise _refuse(ArtifactTooLarge(f"{content_length} bytes exceeds {store.max_bytes}"))
    existing = await to_thread.run_sync(_lookup, context, path)
    if existing is not None:
        if existing.sha256 != expected:
            raise _refuse(ArtifactConflict(f"{path} already holds sha256 {existing.sha256}"))
        # Same content already here: nothing to read, nothing to write.
        response.status_code = 200
        return ArtifactOut.model_validate(existing)
    try:
        upload = store.begin(path, expected)
        try:
            await _receive(request, upload)
            stored, _ = await to_thread.run_sync(upload.commit)
        finally:
            upload.abort()
        created, row = await to_thread.run_sync(_record, context, stored)
    except ArtifactError as exc:
        raise _refuse(exc) from exc
    except ArtifactMismatch as exc:
        raise HTTPException(409, detail={"reason": exc.reason, "message": str(exc)}) from exc
    response.status_code = 201 if created else 200
    return ArtifactOut.model_validate(row)
