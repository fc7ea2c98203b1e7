"""Alembic migrations on a real SQLite file: head equals the models, down and up again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from controlplane.db import Base, make_engine, upgrade_to_head
from controlplane.db.migrate import alembic_config, current_revision, head_revision

MODEL_TABLES = set(Base.metadata.tables)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cp.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _schema_diffs(engine: Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def _tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def test_upgrade_head_on_a_fresh_file_matches_the_models(db_url: str, engine: Engine) -> None:
    assert current_revision(engine) is None
    upgrade_to_head(db_url)
    assert current_revision(engine) == head_revision()
    assert _tables(engine) == MODEL_TABLES | {"alembic_version"}
    assert _schema_diffs(engine) == []


def test_schema_comparison_notices_drift(db_url: str, engine: Engine) -> None:
    """The equality above means something: a missing index or column is reported."""
    upgrade_to_head(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_devices_tier"))
        conn.execute(text("ALTER TABLE telemetry DROP COLUMN temp_c"))
    found = {(d[0], d[-1].name) for d in _schema_diffs(engine)}
    assert found == {("add_index", "ix_devices_tier"), ("add_column", "temp_c")}


def test_downgrade_to_base_drops_every_table(db_url: str, engine: Engine) -> None:
    upgrade_to_head(db_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert current_revision(engine) is None
    # Only Alembic's own bookkeeping table may remain, and it is empty.
    assert _tables(engine) <= {"alembic_version"}
    with engine.connect() as conn:
        if "alembic_version" in _tables(engine):
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0

    # ...and the way back up gives the same schema again.
    upgrade_to_head(db_url)
    assert _schema_diffs(engine) == []


def test_upgrade_is_idempotent_and_keeps_data(db_url: str, engine: Engine) -> None:
    upgrade_to_head(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (id, labels, simulated, online, first_seen, "
                "state_changed_at) VALUES ('dev-1', '{}', 0, 0, 1.0, 1.0)"
            )
        )
    upgrade_to_head(db_url)
    upgrade_to_head(engine)  # the Engine form, as ControlPlane calls it
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM devices")).scalars().all() == ["dev-1"]
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    assert _schema_diffs(engine) == []


def test_database_runs_in_wal_mode(tmp_path: Path, db_url: str, engine: Engine) -> None:
    upgrade_to_head(db_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    # WAL is a property of the file: a connection that sets no pragma sees it too.
    raw = sqlite3.connect(tmp_path / "cp.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


# --- 0002: model registry and director ----------------------------------------


def test_registry_upgrade_keeps_devices_and_starts_with_no_update_status(
    db_url: str, engine: Engine
) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(
            text(
                "INSERT INTO devices (id, labels, simulated, online, first_seen, "
                "state_changed_at) VALUES ('dev-1', '{}', 0, 0, 1.0, 1.0)"
            )
        )
    upgrade_to_head(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, update_status FROM devices")).all()
    assert [tuple(r) for r in rows] == [("dev-1", None)]
    assert _schema_diffs(engine) == []
    # ...and back: 0001's schema again, the device still there.
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    assert "assignments" not in _tables(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM devices")).scalars().all() == ["dev-1"]


def test_head_matches_the_models_on_postgresql() -> None:
    """The semver sort key's collation and the 64-bit ids are PostgreSQL-only variants."""
    from tests.support.postgres import PostgresCluster, server_bin

    if server_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    cluster = PostgresCluster().start()
    try:
        engine = make_engine(cluster.create_database("migrations"))
        try:
            upgrade_to_head(engine)
            assert _schema_diffs(engine) == []
            with engine.connect() as conn:
                collation = conn.execute(
                    text(
                        "SELECT collation_name FROM information_schema.columns "
                        "WHERE table_name = 'model_versions' AND column_name = 'sort_key'"
                    )
                ).scalar()
            assert collation == "C"
            with engine.begin() as conn:
                command.downgrade(alembic_config(conn), "base")
            assert _tables(engine) <= {"alembic_version"}
        finally:
            engine.dispose()
    finally:
        cluster.stop()
