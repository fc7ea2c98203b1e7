"""Content-addressed artifacts: the artifact table becomes an index of paths to blobs,
and each registered release lists the files it refers to.

- ``artifacts.path`` widens to 512 characters: a folder variant's files are
  indexed as ``<artifact>/<file path>``.
- ``model_variants.artifact`` no longer references ``artifacts.path``: a
  folder variant's ``artifact`` is a folder, not an indexed file. What kept
  a registered variant's file from being deleted is now ``release_files``,
  which garbage collection reads.
- ``release_files`` (version, path, sha256, size) is filled from every
  registered envelope: each single-file variant, each file of a folder
  variant, the eval set.

The files on disk move from ``<artifacts_dir>/<path>`` to
``<artifacts_dir>/blobs/sha256/<hex>`` when the control plane next opens
its store (controlplane/artifacts.py), not here: the migration may run
where the store is not.

Create Date: 2026-12-06
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from controlplane.migrations.columns import big_id_reference, big_integer, string
from controlplane.migrations.tables import create_index, create_table

revision: str = "0010"
down_revision: str | None = "0009"

_VARIANT_FK = "fk_model_variants_artifact_artifacts"


def _release_files(signed: dict) -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) of every file a signed manifest refers to (frozen copy
    of controlplane.artifact_index.release_files, for dicts)."""
    out: dict[str, tuple[str, int]] = {}
    for variant in signed.get("variants", {}).values():
        if variant.get("files"):
            for f in variant["files"]:
                out[f"{variant['artifact']}/{f['path']}"] = (f["sha256"], f["size_bytes"])
        else:
            out[variant["artifact"]] = (variant["sha256"], variant["size_bytes"])
    eval_set = signed.get("eval_set")
    if eval_set:
        out[eval_set["artifact"]] = (eval_set["sha256"], eval_set["size_bytes"])
    return out


def upgrade() -> None:
    with op.batch_alter_table("model_variants") as batch:
        batch.drop_constraint(_VARIANT_FK, type_="foreignkey")
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("path", existing_type=sa.String(256), type_=sa.String(512),
                           existing_nullable=False)
    create_table(
        "release_files",
        big_id_reference("version_id"),
        string("path", 512),
        string("sha256", 64),
        big_integer("size_bytes"),
        primary_key=("version_id", "path"),
        references=[("version_id", "model_versions.id", "CASCADE")],
    )
    create_index("release_files", "sha256")

    conn = op.get_bind()
    table = sa.table(
        "release_files",
        sa.column("version_id"), sa.column("path"), sa.column("sha256"), sa.column("size_bytes"),
    )
    for version_id, envelope in conn.execute(sa.text("SELECT id, envelope FROM model_versions")):
        # Registration stored only verified envelopes; anything else lists no files.
        signed = json.loads(envelope).get("signed") if envelope else None
        files = _release_files(signed) if isinstance(signed, dict) else {}
        if files:
            conn.execute(table.insert(), [
                {"version_id": version_id, "path": path, "sha256": sha, "size_bytes": size}
                for path, (sha, size) in files.items()
            ])


def downgrade() -> None:
    # A release with a folder variant cannot be described by the earlier
    # schema (its artifact is no indexed file): downgrade after removing it.
    op.drop_index(op.f("ix_release_files_sha256"), table_name="release_files")
    op.drop_table("release_files")
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("path", existing_type=sa.String(512), type_=sa.String(256),
                           existing_nullable=False)
    with op.batch_alter_table("model_variants") as batch:
        batch.create_foreign_key(_VARIANT_FK, "artifacts", ["artifact"], ["path"],
                                 ondelete="RESTRICT")
