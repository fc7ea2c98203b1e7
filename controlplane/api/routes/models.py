"""``/v1/models``: register signed releases and read the registry."""

from __future__ import annotations

import json

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy.orm import Session

from controlplane.api.deps import ContextDep, SessionDep, described, not_configured, off_response
from controlplane.api.pagination import PageDep
from controlplane.api.schemas_registry import (
    ModelPage,
    ModelSummary,
    VariantOut,
    VersionDetail,
    VersionPage,
    VersionSummary,
)
from controlplane.context import AppContext
from controlplane.db.models import ModelVersion
from controlplane.registry import (
    ReleaseConflict,
    ReleaseRejected,
    get_version,
    latest_versions,
    list_models,
    list_versions,
    register_release,
    variants_of,
)
from protocol import MAX_RELEASE_BYTES, KeyList

router = APIRouter(prefix="/v1/models", tags=["models"])

#: protocol reasons that mean "not a release envelope at all" rather than "untrusted"
_BAD_REQUEST = {"malformed", "wrong_schema"}
REGISTRY_OFF = (
    "the model registry is off: set release_keys_file to the pinned release key list "
    "(`slmfleet keys generate --role release`, then `slmfleet keys list`; see docs/models.md)"
)


#: the shape of a signed release envelope; `slmfleet models publish` makes one
_ENVELOPE_SCHEMA = {
    "type": "object",
    "description": "a signed release: the manifest and a threshold of release-key "
    "signatures over its canonical JSON (docs/models.md)",
    "required": ["signed", "signatures"],
    "additionalProperties": False,
    "properties": {
        "signed": {"type": "object", "description": "the release manifest"},
        "signatures": {"type": "array", "items": {"type": "object"}},
    },
}


def _release_keys(context: AppContext) -> KeyList:
    if context.trust.release_keys is None:
        raise not_configured(REGISTRY_OFF)
    return context.trust.release_keys


async def _read_body(request: Request) -> bytes:
    # A release is small by protocol (MAX_RELEASE_BYTES); stop reading past it.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_RELEASE_BYTES:
            raise HTTPException(
                413,
                detail={
                    "reason": "too_large",
                    "message": f"a signed release is at most {MAX_RELEASE_BYTES} bytes",
                },
            )
    return bytes(body)


def _detail(row: ModelVersion, session: Session) -> VersionDetail:
    envelope = json.loads(row.envelope)
    variants = variants_of(session, row.id)
    return VersionDetail(
        **VersionSummary.model_validate(row).model_dump(),
        variants=[VariantOut.model_validate(v) for v in variants],
        manifest=envelope["signed"],
        envelope=envelope,
    )


@router.get("", response_model=ModelPage)
def get_models(session: SessionDep, page: PageDep) -> ModelPage:
    """Registered models by name, each with its newest version."""
    rows = list_models(session, after=page.after(), limit=page.fetch)
    served, after = page.cut(rows, lambda m: m.name)
    latest = latest_versions(session, [m.name for m in served])
    return ModelPage(
        items=[
            ModelSummary(
                name=m.name,
                created_at=m.created_at,
                latest_version=latest[m.name].version if m.name in latest else None,
                description=latest[m.name].description if m.name in latest else "",
            )
            for m in served
        ],
        next=after,
    )


@router.post(
    "",
    response_model=VersionDetail,
    status_code=201,
    responses=described(
        {
            200: ("this exact manifest was already registered", VersionDetail),
            400: "not a release envelope (JSON, shape, schema)",
            409: "name@version is registered with a different manifest",
            413: "larger than a release may be",
            422: "release signatures below threshold, or an artifact is missing",
        },
        off_response("the release key list"),
    ),
    # The body is read raw (its bytes are what the signatures cover), so FastAPI
    # cannot see it; describe it here.
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": _ENVELOPE_SCHEMA}}}},
)
async def post_model(request: Request, response: Response, context: ContextDep) -> VersionDetail:
    """Register a signed release envelope (the JSON `slmfleet models publish` sends).

    Signatures are checked against the pinned release keys before anything
    is read from it; every variant's artifact must already be uploaded.
    """
    release_keys = _release_keys(context)
    payload = await _read_body(request)

    def register() -> VersionDetail:
        with context.sessions() as session:
            store = context.artifacts
            outcome = register_release(
                session, payload, release_keys,
                has_blob=None if store is None else store.has,
            )
            response.status_code = 201 if outcome.created else 200
            return _detail(outcome.version, session)

    try:
        return await to_thread.run_sync(register)
    except ReleaseRejected as exc:
        code = 413 if exc.reason == "too_large" else 400 if exc.reason in _BAD_REQUEST else 422
        raise HTTPException(code, detail={"reason": exc.reason, "message": str(exc)}) from exc
    except ReleaseConflict as exc:
        raise HTTPException(409, detail={"reason": exc.reason, "message": str(exc)}) from exc


@router.get(
    "/{name}/versions",
    response_model=VersionPage,
    responses=described({404: "no such model"}),
)
def get_versions(
    name: str, session: SessionDep, page: PageDep
) -> VersionPage:
    """Versions of a model, newest first by semver precedence."""
    start = page.after(_version_key)
    rows = list_versions(session, name, after=start, limit=page.fetch)
    if not rows and start is None:
        raise HTTPException(404, detail=f"model {name!r} not found")
    served, after = page.cut(rows, lambda v: f"{v.sort_key} {v.version}")
    return VersionPage(items=[VersionSummary.model_validate(v) for v in served], next=after)


def _version_key(raw: str) -> tuple[str, str]:
    key, sep, version = raw.partition(" ")
    if not sep:
        raise ValueError(f"not a version key: {raw!r}")
    return key, version


@router.get(
    "/{name}/versions/{version}",
    response_model=VersionDetail,
    responses=described({404: "no such version"}),
)
def get_model_version(
    name: str, version: str, session: SessionDep, context: ContextDep
) -> VersionDetail:
    """One release: manifest, variants and the signed envelope exactly as registered."""
    row = get_version(session, name, version)
    if row is None:
        raise HTTPException(404, detail=f"{name}@{version} not found")
    return _detail(row, session)
