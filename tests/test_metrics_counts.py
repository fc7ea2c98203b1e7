"""Device counts for ``/metrics`` kept as rows are written, exact against a fresh GROUP BY.

Devices are written the ways the control plane writes them (the ingest's
batch writer for hellos, tier and form changes, online and offline
states and heartbeats; offline detection; a plain SQL delete), on SQLite
and on a real PostgreSQL, and after every step the counts read from
``device_counts`` must equal a ``GROUP BY`` over ``devices``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, update

import protocol as p
from controlplane.db import Device, make_engine, upgrade_to_head
from controlplane.db.device_counts import FleetCounts, compact, counts, read_counts, trigger_names
from controlplane.db.queries import count_devices_by_form, count_devices_by_tier_and_state
from controlplane.db.session import session_factory
from controlplane.db.writes import BatchStore, IngestItem
from controlplane.liveness import LivenessCheck, mark_silent_devices_offline
from tests.support.controlplane import hello, state, telemetry
from tests.support.migrated import KINDS, migrated_engine


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database of each kind."""
    yield from migrated_engine(request, tmp_path)


def _item(kind: p.TopicKind, message: Any, at: float | None = None) -> IngestItem:
    return IngestItem(kind, message, time.time() if at is None else at, False)


def _hello(device: str, tier: str = "micro", sets: bool = False) -> IngestItem:
    message = hello(device, tier=tier)
    if sets:  # an agent saying hello/2 lists its models instead of one active model
        message = message.model_copy(update={"schema_": p.HELLO_SCHEMA_SETS,
                                             "active_model": None})
    return _item(p.TopicKind.HELLO, message)


def _state(device: str, online: bool) -> IngestItem:
    return _item(p.TopicKind.STATE, state(device, online=online))


def _beat(device: str, seq: int, at: float | None = None) -> IngestItem:
    return _item(p.TopicKind.TELEMETRY, telemetry(device, seq), at)


def _group_by(engine: Engine) -> FleetCounts:
    """What the scrape used to compute: a GROUP BY over every device."""
    with session_factory(engine)() as session:
        return FleetCounts(
            {(tier, online): n for tier, online, n in count_devices_by_tier_and_state(session)},
            dict(count_devices_by_form(session)),
        )


def _assert_exact(engine: Engine) -> FleetCounts:
    with engine.connect() as conn:
        kept = read_counts(conn)
    assert kept == _group_by(engine)
    return kept


def _rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(counts)).scalar_one()


def test_counts_follow_every_writer_exactly(engine: Engine) -> None:
    store = BatchStore(engine)
    assert _assert_exact(engine) == FleetCounts({}, {})
    # hellos of new devices, in three tiers and both forms, in one batch
    store.write([_hello(f"d{i}", tier=("micro", "small", "medium")[i % 3], sets=i % 4 == 0)
                 for i in range(12)])
    kept = _assert_exact(engine)
    assert kept.by_tier_and_state == {("micro", True): 4, ("small", True): 4,
                                      ("medium", True): 4}
    assert kept.by_form == {"single": 9, "set": 3}
    # a device first heard through a heartbeat has no tier yet
    store.write([_beat("stray", 1)])
    assert _assert_exact(engine).by_tier_and_state[(None, True)] == 1
    # offline by the device's will, then back online in the same batch for one of them
    store.write([_state("d0", False), _state("d1", False), _state("d1", True)])
    kept = _assert_exact(engine)
    assert kept.by_tier_and_state[("micro", False)] == 1
    # a tier change and a form upgrade through a new hello
    store.write([_hello("d2", tier="micro", sets=True), _hello("stray", tier="small")])
    _assert_exact(engine)
    # offline detection marks the silent ones (every device here is silent at now + 1 h)
    with engine.begin() as conn:
        conn.execute(update(Device).where(Device.id.in_(["d3", "d4"]))
                     .values(last_seen=time.time() - 7200))
    assert mark_silent_devices_offline(engine, time.time(), 3600) == 2
    kept = _assert_exact(engine)
    assert kept.by_tier_and_state[("micro", False)] == 2  # d0 and d3
    # heartbeats bring silent devices back; deletes take devices (and their rows) away
    store.write([_beat("d3", 1), _beat("d4", 1)])
    with engine.begin() as conn:
        conn.execute(delete(Device).where(Device.id.in_(["d5", "d6", "stray"])))
    kept = _assert_exact(engine)
    assert sum(kept.by_form.values()) == 10
    # a direct update of the columns, as an operator's SQL would do it
    with engine.begin() as conn:
        conn.execute(update(Device).where(Device.id == "d7").values(tier=None, online=False))
    _assert_exact(engine)


def test_compaction_folds_rows_and_keeps_the_counts(engine: Engine) -> None:
    store = BatchStore(engine)
    store.write([_hello(f"c{i}", tier="small") for i in range(20)])
    for _ in range(3):
        store.write([_state(f"c{i}", False) for i in range(10)])
        store.write([_state(f"c{i}", True) for i in range(10)])
    before = _assert_exact(engine)
    assert _rows(engine) > 2
    with engine.begin() as conn:
        removed = compact(conn)
    assert removed > 0
    assert _rows(engine) == 1  # every device is small, online, single
    assert _assert_exact(engine) == before
    with engine.begin() as conn:
        assert compact(conn) == 0  # nothing to fold twice


def test_offline_detection_folds_the_counts_even_while_it_holds_off(engine: Engine) -> None:
    """The scheduled check folds on every run, also in its first silence period."""
    store = BatchStore(engine)
    store.write([_hello(f"l{i}", tier="medium") for i in range(10)])
    store.write([_state(f"l{i}", False) for i in range(5)])
    before = _assert_exact(engine)
    assert _rows(engine) > 2
    check = LivenessCheck(engine, max_silence_s=3600)  # just started: marks nothing yet
    assert check() == 0
    assert _rows(engine) == 2  # medium online, medium offline
    assert _assert_exact(engine) == before


def test_heartbeats_of_online_devices_add_no_rows(engine: Engine) -> None:
    """The hot path: a heartbeat moves last_seen only, so the counts are not touched."""
    store = BatchStore(engine)
    store.write([_hello(f"h{i}") for i in range(50)])
    with engine.begin() as conn:
        compact(conn)
    rows = _rows(engine)
    for seq in range(1, 4):
        store.write([_beat(f"h{i}", seq) for i in range(50)])
    assert _rows(engine) == rows
    _assert_exact(engine)


def test_the_migration_counts_the_devices_already_there(tmp_path: Path) -> None:
    """A database upgraded with devices in it starts with their counts, and the triggers."""
    from alembic import command

    from controlplane.db.migrate import alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0011")
    BatchStore(engine).write([_hello("u1", tier="small"), _hello("u2", sets=True),
                              _state("u2", False)])
    upgrade_to_head(engine)
    with engine.connect() as conn:
        assert trigger_names(conn) >= {"device_counts_insert", "device_counts_delete",
                                       "device_counts_update"}
    kept = _assert_exact(engine)
    assert kept.by_tier_and_state == {("small", True): 1, ("micro", False): 1}
    engine.dispose()
