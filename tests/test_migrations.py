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
from controlplane.retention.partitions import is_partition

MODEL_TABLES = set(Base.metadata.tables)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cp.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _not_a_partition(name: str | None, kind: str, _parents: object) -> bool:
    # PostgreSQL's day partitions of telemetry are made at run time, not by models.
    return kind != "table" or name is None or not is_partition(name)


def _schema_diffs(engine: Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_name": _not_a_partition})
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


# --- 0006: event codes; statuses stored as the same strings ---------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, db_url: str) -> str:
    """A fresh database on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        return db_url
    return request.getfixturevalue("postgres_url")


def _insert_event(conn, seq: int, reason: str | None) -> None:
    conn.execute(
        text("INSERT INTO device_events (device_id, seq, ts, received_at, type, reason) "
             "VALUES ('dev-1', :seq, 1.0, 1.0, 'rejected', :reason)"),
        {"seq": seq, "reason": reason},
    )


def test_event_codes_upgrade_fills_codes_from_old_reasons(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0005")
            conn.execute(text(
                "INSERT INTO devices (id, labels, simulated, online, first_seen, "
                "state_changed_at) VALUES ('dev-1', '{}', false, false, 1.0, 1.0)"))
            for seq, reason in enumerate([
                "insufficient_ram: needs 2 GiB, has 1 GiB", "transport", None,
                "no code here", "variant_mismatch: nothing emits this",
            ]):
                _insert_event(conn, seq, reason)
        upgrade_to_head(engine)
        with engine.connect() as conn:
            codes = conn.execute(text("SELECT seq, code FROM device_events ORDER BY seq")).all()
        assert [tuple(r) for r in codes] == [
            (0, "insufficient_ram"), (1, "transport"), (2, None), (3, None), (4, None),
        ]
        assert _schema_diffs(engine) == []
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0005")
        assert "code" not in {c["name"] for c in inspect(engine).get_columns("device_events")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM device_events")).scalar() == 5
    finally:
        engine.dispose()


def test_statuses_are_stored_as_the_strings_earlier_releases_wrote(any_db_url: str) -> None:
    """Enum columns hold each member's value in a plain string column: what an
    older release wrote reads back as the member, and what this one writes is
    the same string, read with plain SQL."""
    from sqlalchemy.orm import Session

    from controlplane.db.models import AssignmentRecord, DeviceEvent, Rollout, RolloutDevice
    from controlplane.db.statuses import AssignmentStatus, MemberState, RolloutState
    from protocol import EventCode

    upgrade_to_head(any_db_url)
    engine = make_engine(any_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO devices (id, labels, simulated, online, first_seen, "
                "state_changed_at) VALUES ('dev-1', '{}', false, false, 1.0, 1.0)"))
            conn.execute(text("INSERT INTO models (name, created_at) VALUES ('m', 1.0)"))
            conn.execute(text(
                "INSERT INTO model_versions (id, model_name, version, sort_key, released_at, "
                "registered_at, description, manifest_sha256, envelope) "
                "VALUES (1, 'm', '1.0.0', '00', 1.0, 1.0, '', 'x', '{}')"))
            # Rows as an earlier release wrote them, plain strings.
            conn.execute(text(
                "INSERT INTO assignments (assignment_id, device_id, version_id, model_name, ref, "
                "tier, sequence, issued_at, expires_at, kind, status, envelope) VALUES ('a-1', "
                "'dev-1', 1, 'm', 'm@1.0.0', 'micro', 1, 1.0, 2.0, 'assign', 'revoked', '{}')"))
            conn.execute(text(
                "INSERT INTO rollouts (id, model_name, version, version_id, spec, state, "
                "stage_index, approved_stage, revision, created_at, updated_at) VALUES "
                "('r-1', 'm', '1.0.0', 1, '{}', 'awaiting_approval', 0, -1, 0, 1.0, 1.0)"))
            conn.execute(text(
                "INSERT INTO rollout_devices (rollout_id, device_id, cohort_key, state, "
                "updated_at) VALUES ('r-1', 'dev-1', 'k', 'rolled_back', 1.0)"))
        with Session(engine) as session:
            assert session.get(AssignmentRecord, 1).status is AssignmentStatus.REVOKED
            rollout = session.get(Rollout, "r-1")
            assert rollout.state is RolloutState.AWAITING_APPROVAL
            member = session.get(RolloutDevice, ("r-1", "dev-1"))
            assert member.state is MemberState.ROLLED_BACK
            rollout.state = RolloutState.ROLLING_BACK
            member.state = MemberState.INCOMPATIBLE
            session.get(AssignmentRecord, 1).status = AssignmentStatus.ACTIVE
            session.add(DeviceEvent(device_id="dev-1", seq=1, ts=1.0, received_at=1.0,
                                    type="rejected", code=EventCode.DOES_NOT_FIT))
            session.commit()
        with engine.connect() as conn:
            raw = conn.execute(text(
                "SELECT a.status, r.state, d.state, e.code FROM assignments a, rollouts r, "
                "rollout_devices d, device_events e")).one()
        assert tuple(raw) == ("active", "rolling_back", "incompatible", "does_not_fit")
        assert all(type(v) is str for v in raw)
    finally:
        engine.dispose()
