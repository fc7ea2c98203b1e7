"""Moving to the content-addressed store: files of the old layout are adopted once
(crash-safely), and the database migration lists every registered release's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alembic import command
from sqlalchemy import text

from controlplane.artifacts import ArtifactStore
from controlplane.db import make_engine, upgrade_to_head
from controlplane.db.migrate import alembic_config
from tests.support.registry import blob

GGUF = blob("old-gguf", 70_000)
SHA = hashlib.sha256(GGUF).hexdigest()


def _old_layout(root: Path) -> list[Path]:
    """The store as the path-per-file layout left it: the same model at three tier paths."""
    files = [root / "smollm2" / "1.0.0" / tier / "model.gguf" for tier in ("micro", "small")]
    files.append(root / "smollm2" / "1.1.0" / "micro" / "model.gguf")
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(GGUF)
    other = root / "eval" / "set.json"
    other.parent.mkdir(parents=True)
    other.write_bytes(b'{"items": []}')
    return files


def test_old_layout_files_become_one_blob_each_and_the_old_paths_go(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    _old_layout(root)
    store = ArtifactStore(root, 1 << 30).open()
    assert sorted(p.name for p in store.blobs.iterdir()) == sorted(
        [SHA, hashlib.sha256(b'{"items": []}').hexdigest()])
    assert (store.blobs / SHA).read_bytes() == GGUF
    # Only the store's own directories are left.
    assert sorted(p.name for p in root.iterdir()) == [".incoming", "blobs"]
    # Opening again changes nothing.
    ArtifactStore(root, 1 << 30).open()
    assert (store.blobs / SHA).read_bytes() == GGUF


def test_a_crash_between_link_and_unlink_only_repeats_the_move(tmp_path: Path) -> None:
    """Both names exist (linked, not yet unlinked): the next start finishes the job."""
    root = tmp_path / "artifacts"
    files = _old_layout(root)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / SHA).hardlink_to(files[0])
    store = ArtifactStore(root, 1 << 30).open()
    assert not any(f.exists() for f in files)
    assert (store.blobs / SHA).read_bytes() == GGUF
    # A half-written upload left by the same crash is cleared, never adopted.
    (store.incoming / "x.part").write_bytes(b"partial")
    ArtifactStore(root, 1 << 30).open()
    assert list(store.incoming.iterdir()) == []


def _envelope(variants: dict, eval_set: dict | None = None) -> str:
    signed: dict = {"name": "smollm2", "version": "1.0.0", "variants": variants}
    if eval_set:
        signed["eval_set"] = eval_set
    return json.dumps({"signed": signed, "signatures": []})


def test_migration_lists_each_registered_release_s_files(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    micro = {"artifact": "smollm2/1.0.0/micro/model.gguf", "sha256": SHA, "size_bytes": 70_000}
    small = {"artifact": "smollm2/1.0.0/small/onnx", "sha256": "c" * 64, "size_bytes": 30,
             "files": [{"path": "model.onnx", "sha256": "a" * 64, "size_bytes": 10},
                       {"path": "tokenizer.json", "sha256": "b" * 64, "size_bytes": 20}]}
    eval_set = {"artifact": "smollm2/eval.json", "sha256": "d" * 64, "size_bytes": 5}
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0008")
        conn.execute(text("INSERT INTO models (name, created_at) VALUES ('smollm2', 1.0)"))
        conn.execute(
            text("INSERT INTO model_versions (id, model_name, version, sort_key, released_at, "
                 "registered_at, description, manifest_sha256, envelope) VALUES (7, 'smollm2', "
                 "'1.0.0', 'k', 1.0, 1.0, '', :digest, :envelope)"),
            {"digest": "e" * 64,
             "envelope": _envelope({"micro": micro, "small": small}, eval_set)},
        )
    upgrade_to_head(engine)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT version_id, path, sha256, size_bytes FROM release_files ORDER BY path"
        )).all()
    assert [tuple(r) for r in rows] == [
        (7, "smollm2/1.0.0/micro/model.gguf", SHA, 70_000),
        (7, "smollm2/1.0.0/small/onnx/model.onnx", "a" * 64, 10),
        (7, "smollm2/1.0.0/small/onnx/tokenizer.json", "b" * 64, 20),
        (7, "smollm2/eval.json", "d" * 64, 5),
    ]
    engine.dispose()
