"""A migrated control-plane database of each kind, and bare rows tests build on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, insert

from controlplane.db import make_engine, upgrade_to_head
from controlplane.db.models import Model, ModelVersion, Rollout

#: the fixture params of a test run on SQLite and on a real PostgreSQL
KINDS = ["sqlite", "postgresql"]


def migrated_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """Body of a fixture parametrised with :data:`KINDS`: an engine on a database at head."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'cp.db'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


def add_release(conn: Connection, model: str = "m", version: str = "1.1.0") -> int:
    """A bare ``model_versions`` row (and its model) for rows that reference one; its id."""
    now = time.time()
    conn.execute(insert(Model), [{"name": model, "created_at": now}])
    return conn.execute(insert(ModelVersion).returning(ModelVersion.id), [{
        "model_name": model, "version": version, "sort_key": "01", "released_at": now,
        "registered_at": now, "description": "", "manifest_sha256": "0" * 64,
        "envelope": "{}"}]).scalar_one()


def add_rollout(conn: Connection, rollout_id: str, version_id: int, *, state: str = "active",
                created_at: float | None = None, model: str = "m",
                version: str = "1.1.0") -> None:
    """A bare ``rollouts`` row in ``state``."""
    at = time.time() if created_at is None else created_at
    conn.execute(insert(Rollout), [{
        "id": rollout_id, "model_name": model, "version": version, "version_id": version_id,
        "spec": {}, "state": state, "stage_index": 0, "approved_stage": -1, "revision": 0,
        "created_at": at, "updated_at": at}])
