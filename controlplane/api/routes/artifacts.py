"""``/v1/artifacts``: serve model files by path with HTTP Range; upload one by path.

A path resolves through the artifact index (controlplane/artifact_index.py)
to a blob stored once by its sha256. ``GET``/``HEAD`` answer 200, 206 with
``Content-Range`` for a satisfiable range, or 416 with ``Content-Range:
bytes */N``; ``ETag`` is the quoted sha256, so ``If-Range`` with it resumes
only the same content. Content at a path never changes, so responses may be
cached for good, and so may the resolution: it is kept in memory, and a
download asks the database only the first time its path is seen.

``PUT`` streams the body to disk while hashing it; the file becomes visible
only once its sha256 matches ``X-Content-SHA256``. ``slmfleet models
publish`` uses ``/v1/blobs`` instead: it uploads only the blobs the store
lacks, and registering the release records the paths.
"""

from __future__ import annotations

import re
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.responses import FileResponse

from controlplane.api.blob_transfer import path_cache, receive, refuse, store_of
from controlplane.api.deps import ContextDep, described
from controlplane.api.schemas_registry import ArtifactOut
from controlplane.artifact_index import PathConflict, record_path
from controlplane.artifacts import (
    ArtifactConflict,
    ArtifactError,
    ArtifactTooLarge,
    BadArtifactPath,
    StoredFile,
    check_path,
)
from controlplane.context import AppContext
from controlplane.db.models import Artifact

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: what ``X-Content-SHA256`` may hold: the hex digest, either case, blanks around it
#: (the route strips and lower-cases it before comparing)
SHA256_HEADER_PATTERN = r"^\s*[0-9a-fA-F]{64}\s*$"
#: content at a path never changes (a different blob is a 409), so caches may keep it
IMMUTABLE = "public, max-age=31536000, immutable"


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
def get_artifact_file(path: str, request: Request, context: ContextDep) -> Response:
    """The artifact's bytes; honours ``Range`` and ``If-Range``."""
    store = store_of(context)
    try:
        check_path(path)
    except BadArtifactPath as exc:
        raise HTTPException(404, detail=f"artifact {path!r} not found") from exc
    found = path_cache(request, context).resolve(path)
    file = store.blob_path(found[0]) if found is not None else None
    if found is None or file is None or not file.is_file():
        raise HTTPException(404, detail=f"artifact {path!r} not found")
    return FileResponse(
        file,
        media_type="application/octet-stream",
        headers={"ETag": f'"{found[0]}"', "Cache-Control": IMMUTABLE},
    )


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length", "")
    # The HTTP server has refused a framing header that is not a number.
    return int(raw) if raw.isdigit() else None


def _lookup(context: AppContext, path: str) -> Artifact | None:
    with context.sessions() as session:
        return session.get(Artifact, path)


def _record(context: AppContext, stored: StoredFile) -> tuple[bool, Artifact | None]:
    with context.sessions() as session:
        created = record_path(session, stored)
        return created, session.get(Artifact, stored.path)


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
    store = store_of(context)
    # Read from the request, not declared as a parameter: Content-Length frames
    # the body, and a client cannot choose it apart from what it sends.
    content_length = _content_length(request)
    expected = x_content_sha256.strip().lower()
    if not _SHA256.fullmatch(expected):
        raise HTTPException(
            422,
            detail={"reason": "missing_digest", "message": "X-Content-SHA256 must be a sha256 hex"},
        )
    try:
        check_path(path)
    except BadArtifactPath as exc:
        raise refuse(exc) from exc
    if content_length is not None and content_length > store.max_bytes:
        raise refuse(ArtifactTooLarge(f"{content_length} bytes exceeds {store.max_bytes}"))
    existing = await to_thread.run_sync(_lookup, context, path)
    if existing is not None:
        if existing.sha256 != expected:
            raise refuse(ArtifactConflict(f"{path} already holds sha256 {existing.sha256}"))
        if store.has(existing.sha256, existing.size_bytes):
            # Same content already here: nothing to read, nothing to write.
            response.status_code = 200
            return ArtifactOut.model_validate(existing)
    try:
        blob = await receive(request, store, expected)
        created, row = await to_thread.run_sync(
            _record, context, StoredFile(path, blob.sha256, blob.size_bytes))
    except ArtifactError as exc:
        raise refuse(exc) from exc
    except PathConflict as exc:
        raise HTTPException(409, detail={"reason": exc.reason, "message": str(exc)}) from exc
    response.status_code = 201 if created else 200
    return ArtifactOut.model_validate(row)
