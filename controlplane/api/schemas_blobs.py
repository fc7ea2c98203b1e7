"""Request and response bodies of the ``/v1/blobs`` routes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from controlplane.blob_gc import DEFAULT_GRACE_S

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
#: one question may name at most this many digests (a release has a few dozen files)
MAX_DIGESTS = 10_000


class MissingIn(BaseModel):
    """Digests a publisher holds locally."""

    model_config = ConfigDict(extra="forbid", strict=True)

    digests: Annotated[list[Sha256], Field(max_length=MAX_DIGESTS)]


class MissingOut(BaseModel):
    """Those of the asked digests the store lacks (in the order asked, once each)."""

    missing: list[str]


class BlobOut(BaseModel):
    """A blob in the store."""

    sha256: str
    size_bytes: int


class CollectIn(BaseModel):
    """One garbage collection."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dry_run: bool = Field(False, description="report what would go; remove nothing")
    grace_s: float = Field(
        DEFAULT_GRACE_S, ge=0, le=365 * 86400,
        description="keep blobs and paths stored or asked for less than this long ago",
    )


class CollectOut(BaseModel):
    """What a collection removed (or, dry, would remove)."""

    dry_run: bool
    removed_blobs: list[str]
    removed_bytes: int
    removed_paths: list[str]
    kept_blobs: int
    kept_bytes: int
