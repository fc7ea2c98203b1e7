"""The model registry: signed releases and the artifacts they name, in SQL.

:func:`register_release` is the only way a release gets in. It verifies the
envelope against the pinned release keys (:func:`protocol.verify_release`)
before reading anything from it, requires every file it refers to (each
variant's file or each file of a folder variant, the eval set) to be in the
store already with the declared digest and size, lists those files as the
release's (:class:`ReleaseFile`, what garbage collection keeps), and stores the
envelope as canonical JSON -- the bytes every assignment will embed, which
verify on the device exactly as they verified here.

Errors: :class:`ReleaseRejected` (the release is bad: signatures, schema,
size, a missing artifact), :class:`ReleaseConflict` (``name@version`` is
taken by a different manifest).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controlplane.attributes import same_named
from protocol import (
    MAX_RELEASE_BYTES,
    KeyList,
    ProtocolError,
    canonical_json,
    load_json,
    verify_release,
)

from .artifact_index import PathConflict, record_path, release_files
from .artifacts import StoredFile
from .db.models import Artifact, Model, ModelVariant, ModelVersion, ReleaseFile
from .semver_order import sort_key

#: does the store hold this blob, with this size?
HasBlob = Callable[[str, int], bool]


class RegistryError(Exception):
    """Base of the registry's refusals; ``reason`` is a short machine label."""

    reason = "registry_error"


class ReleaseRejected(RegistryError):
    """The release cannot be registered; ``reason`` says why (a protocol reason or ours)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReleaseConflict(RegistryError):
    """``name@version`` is already registered with a different manifest."""

    reason = "conflict"


@dataclass(frozen=True)
class Registered:
    """Outcome of :func:`register_release`."""

    version: ModelVersion
    created: bool


def manifest_digest(signed: dict[str, object]) -> str:
    """sha256 of the canonical signed manifest: two uploads are identical iff these match."""
    return hashlib.sha256(canonical_json(signed)).hexdigest()


def _index_release_files(
    session: Session, files: dict[str, tuple[str, int]], has_blob: HasBlob | None
) -> None:
    """Record every path of a release before it is registered. Commits.

    Raises :class:`ReleaseRejected` with reason ``artifact_mismatch`` (a path
    already resolves to other content) or ``missing_artifact`` (neither
    recorded nor in the store). Nothing is recorded unless every file passes.
    """
    recorded = {a.path: a for a in session.scalars(select(Artifact).where(
        Artifact.path.in_(list(files))))}
    new = []
    for path, (sha256, size) in sorted(files.items()):
        found = recorded.get(path)
        if found is not None:
            if (found.sha256, found.size_bytes) != (sha256, size):
                raise ReleaseRejected(
                    "artifact_mismatch",
                    f"{path!r} is stored as sha256 {found.sha256}, {found.size_bytes} bytes; "
                    f"the manifest says {sha256}, {size} bytes (paths never change: "
                    "publish under a new version or artifact path)",
                )
        elif has_blob is not None and has_blob(sha256, size):
            new.append(StoredFile(path, sha256, size))
        else:
            raise ReleaseRejected(
                "missing_artifact",
                f"{path!r}: its blob (sha256 {sha256}, {size} bytes) is not in the store; "
                f"upload it first (PUT /v1/blobs/sha256/{sha256})",
            )
    for stored in new:
        try:
            record_path(session, stored)
        except PathConflict as exc:
            raise ReleaseRejected("artifact_mismatch", str(exc)) from exc


def _existing(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.model_name == name, ModelVersion.version == version)
    ).one_or_none()


def _same_or_conflict(existing: ModelVersion, digest: str) -> Registered:
    if existing.manifest_sha256 != digest:
        raise ReleaseConflict(
            f"{existing.model_name}@{existing.version} is already registered with a different "
            "manifest; publish a new version instead"
        )
    return Registered(existing, created=False)


def register_release(
    session: Session,
    payload: bytes,
    release_keys: KeyList,
    *,
    has_blob: HasBlob | None = None,
    now: float | None = None,
) -> Registered:
    """Verify and store a signed release envelope (wire bytes); commit on success.

    Every file the release refers to must resolve: a path already indexed
    with the same digest, or a blob ``has_blob`` finds in the store (the
    path is then indexed). Idempotent: registering the same manifest again
    returns the stored version with ``created=False``.
    """
    now = time.time() if now is None else now
    try:
        # R1-R4 in protocol.manifest: bounded, signatures first, then schema.
        manifest = verify_release(payload, release_keys, now=now)
    except ProtocolError as exc:
        raise ReleaseRejected(exc.reason, str(exc)) from exc
    # Parsed again only to keep the raw object: what the signatures cover.
    envelope = load_json(payload, max_bytes=MAX_RELEASE_BYTES, what="release manifest")
    digest = manifest_digest(envelope["signed"])
    try:
        order = sort_key(manifest.version)
    except ValueError as exc:
        raise ReleaseRejected("bad_version", str(exc)) from exc

    existing = _existing(session, manifest.name, manifest.version)
    if existing is not None:
        return _same_or_conflict(existing, digest)
    try:
        files = release_files(manifest)
    except PathConflict as exc:
        raise ReleaseRejected("artifact_mismatch", str(exc)) from exc
    _index_release_files(session, files, has_blob)

    if session.get(Model, manifest.name) is None:
        session.add(Model(name=manifest.name, created_at=now))
    row = ModelVersion(
        model_name=manifest.name,
        version=manifest.version,
        sort_key=order,
        released_at=manifest.released_at,
        registered_at=now,
        description=manifest.description,
        manifest_sha256=digest,
        envelope=canonical_json(envelope).decode("utf-8"),
    )
    session.add(row)
    session.flush()
    for tier, variant in manifest.variants.items():
        session.add(
            ModelVariant(
                version_id=row.id,
                tier=tier.value,
                **same_named(
                    variant, "format", "sha256", "size_bytes", "artifact", "quantization",
                    "parameters", "context_length",
                ),
            )
        )
    session.add_all(
        ReleaseFile(version_id=row.id, path=path, sha256=sha256, size_bytes=size)
        for path, (sha256, size) in files.items()
    )
    try:
        session.commit()
    except IntegrityError:
        # Another request registered the same name@version (or model) first.
        session.rollback()
        existing = _existing(session, manifest.name, manifest.version)
        if existing is None:
            raise
        return _same_or_conflict(existing, digest)
    return Registered(row, created=True)


# --- reads ----------------------------------------------------------------------


def list_models(session: Session, *, after: str | None, limit: int) -> Sequence[Model]:
    """Up to ``limit`` models with a name above ``after``, by name."""
    query = select(Model).order_by(Model.name).limit(limit)
    if after is not None:
        query = query.where(Model.name > after)
    return session.scalars(query).all()


def latest_versions(session: Session, names: Sequence[str]) -> dict[str, ModelVersion]:
    """The newest (semver) version of each model in ``names``."""
    out: dict[str, ModelVersion] = {}
    rows = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_name.in_(names))
        .order_by(ModelVersion.model_name, ModelVersion.sort_key, ModelVersion.version)
    )
    for row in rows:
        out[row.model_name] = row  # ascending, so the last one wins
    return out


def list_versions(
    session: Session, name: str, *, after: tuple[str, str] | None, limit: int
) -> Sequence[ModelVersion]:
    """Versions of ``name``, newest first by semver precedence.

    ``after`` is the ``(sort_key, version)`` of the last row of the previous
    page; build metadata ties on ``sort_key`` and is broken by the string.
    """
    key = tuple_(ModelVersion.sort_key, ModelVersion.version)
    query = (
        select(ModelVersion)
        .where(ModelVersion.model_name == name)
        .order_by(ModelVersion.sort_key.desc(), ModelVersion.version.desc())
        .limit(limit)
    )
    if after is not None:
        query = query.where(key < tuple_(*after))
    return session.scalars(query).all()


def get_version(session: Session, name: str, version: str) -> ModelVersion | None:
    """``name@version``, or None."""
    return _existing(session, name, version)


def variants_of(session: Session, version_id: int) -> Sequence[ModelVariant]:
    """The variants of one registered version, by tier."""
    return session.scalars(
        select(ModelVariant).where(ModelVariant.version_id == version_id).order_by(
            ModelVariant.tier
        )
    ).all()
