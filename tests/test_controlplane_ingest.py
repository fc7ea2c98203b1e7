"""The control plane's MQTT ingest against real Mosquitto (ACLs on) and a real SQLite file.

Each test starts its own :class:`ControlPlane` on a fresh database. The
broker is shared by the whole session, so it replays other tests' retained
hellos to every new control plane: tests look at their own device ids, never
at fleet-wide totals.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import RowMapping, func, select, text
from sqlalchemy.orm import Session

import protocol as p
from controlplane.db.models import (
    CapabilitySnapshot,
    Device,
    DeviceEvent,
    DeviceLabel,
    TelemetryRow,
)
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings, event, hello, state, telemetry, wait_until
from tests.support.mqtt import RawClient

pytestmark = pytest.mark.integration

StartCP = Callable[..., ControlPlane]


@pytest.fixture
def start_cp(tmp_path: Path, broker, cp_credentials) -> Iterator[StartCP]:
    """Factory: start a control plane on a fresh database; stopped at teardown."""
    started: list[ControlPlane] = []

    def start(**overrides: Any) -> ControlPlane:
        settings = cp_settings(tmp_path / f"cp{len(started)}", broker, cp_credentials, **overrides)
        cp = ControlPlane(settings).start()
        started.append(cp)
        ingest = cp.ingest
        # start() returns once subscribed and the writer process is up, so
        # the short liveness windows some tests use are not eaten by imports.
        assert ingest is not None and ingest.wait_ready(0)
        return cp

    yield start
    for cp in started:
        cp.stop()


class DeviceClient(RawClient):
    """A raw MQTT client logged in as a device (its username is its id)."""

    def __init__(self, broker_url: str, device_id: str, password: str) -> None:
        super().__init__(broker_url, device_id, password)
        self.device_id = device_id


@pytest.fixture
def device(broker, new_device) -> Iterator[Callable[[str], DeviceClient]]:
    """Factory: a connected client for a freshly provisioned device ``<prefix>-<hex>``."""
    clients: list[DeviceClient] = []

    def connect(prefix: str) -> DeviceClient:
        device_id = f"{prefix}-{secrets.token_hex(3)}"
        client = DeviceClient(broker.url, device_id, new_device(device_id))
        assert not client.connect().is_failure
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def _send(client: RawClient, message: Any, *, retain: bool = False) -> None:
    kind = {
        p.Hello: p.TopicKind.HELLO,
        p.State: p.TopicKind.STATE,
        p.Telemetry: p.TopicKind.TELEMETRY,
        p.Event: p.TopicKind.EVENTS,
    }[type(message)]
    rc = client.publish(p.device_topic(message.device_id, kind), p.encode(message), retain=retain)
    assert not rc.is_failure, rc


def _row(cp: ControlPlane, device_id: str) -> RowMapping | None:
    assert cp.engine is not None
    with cp.engine.connect() as conn:
        return (
            conn.execute(select(Device.__table__).where(Device.id == device_id)).mappings().first()
        )


def _scalars(cp: ControlPlane, query: Any) -> list[Any]:
    assert cp.engine is not None
    with Session(cp.engine) as session:
        return list(session.scalars(query))


def _count(cp: ControlPlane, model: Any, device_id: str) -> int:
    return _scalars(cp, select(func.count()).where(model.device_id == device_id))[0]


def _telemetry_seqs(cp: ControlPlane, device_id: str) -> list[int]:
    return _scalars(
        cp,
        select(TelemetryRow.seq)
        .where(TelemetryRow.device_id == device_id)
        .order_by(TelemetryRow.seq),
    )


def _metrics(cp: ControlPlane) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{cp.api_url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- hello, telemetry, events ------------------------------------------------------


def test_hello_creates_the_device_and_a_snapshot_only_when_the_report_changes(
    start_cp: StartCP, device
) -> None:
    cp = start_cp()
    dev = device("hello")
    did = dev.device_id

    def snapshots() -> list[tuple[int, str]]:
        rows = _scalars(
            cp,
            select(CapabilitySnapshot)
            .where(CapabilitySnapshot.device_id == did)
            .order_by(CapabilitySnapshot.id),
        )
        return [(r.capabilities["ram_bytes"], r.tier) for r in rows]

    def labels() -> dict[str, str]:
        assert cp.engine is not None
        with cp.engine.connect() as conn:
            rows = conn.execute(
                select(DeviceLabel.key, DeviceLabel.value).where(DeviceLabel.device_id == did)
            )
            return {key: value for key, value in rows}

    _send(dev, hello(did, labels={"site": "lab", "rack": "r1"}))
    row = wait_until(lambda: _row(cp, did), 5, "device row")
    assert (row["tier"], row["profile"], row["agent_version"]) == (
        "micro",
        "raspberry-pi-4-4gb",
        "0.1.0",
    )
    assert row["labels"] == {"site": "lab", "rack": "r1"}
    assert row["online"] is True and row["last_seen"] is not None
    assert row["latest_capabilities"]["cpu"]["model"] == "Cortex-A72"
    assert row["latest_runtimes"] == [{"name": "llama.cpp", "version": "0.3.2", "providers": []}]
    assert row["active_model"]["sha256"] == "ab" * 32
    assert labels() == {"site": "lab", "rack": "r1"}
    assert snapshots() == [(4 * 1024**3, "micro")]

    # The agent re-sends hello on every reconnect: same hardware, new ts and
    # labels. The labels follow; the capability history does not grow.
    _send(dev, hello(did, labels={"site": "field"}))
    wait_until(lambda: _row(cp, did)["labels"] == {"site": "field"}, 5, "relabelled")
    assert labels() == {"site": "field"}
    assert snapshots() == [(4 * 1024**3, "micro")]

    # New hardware (RAM upgrade, new tier) is a new snapshot...
    _send(dev, hello(did, tier="small", ram_bytes=8 * 1024**3, labels={"site": "field"}))
    wait_until(lambda: len(snapshots()) == 2, 5, "second snapshot")
    row = _row(cp, did)
    assert row["tier"] == "small" and row["latest_capabilities"]["ram_bytes"] == 8 * 1024**3
    # ...and so is going back to the first one: the history records each change.
    _send(dev, hello(did, labels={"site": "field"}))
    wait_until(lambda: len(snapshots()) == 3, 5, "third snapshot")
    assert snapshots() == [
        (4 * 1024**3, "micro"),
        (8 * 1024**3, "small"),
        (4 * 1024**3, "micro"),
    ]


def test_telemetry_lands_in_batches(start_cp: StartCP, device) -> None:
    cp = start_cp(ingest_batch_max=8)
    dev = device("tele")
    did = dev.device_id
    for seq in range(50):
        _send(dev, telemetry(did, seq, cpu_percent=float(seq)))
    wait_until(lambda: len(_telemetry_seqs(cp, did)) >= 50, 10, "50 heartbeats")
    assert _telemetry_seqs(cp, did) == list(range(50))
    assert cp.ingest is not None and cp.ingest.flush(5)
    stats = cp.ingest.stats()
    assert stats.batches >= 7  # at most 8 messages a batch
    assert stats.last_batch_size <= 8
    # heard only on telemetry: a row without hello fields, alive
    row = _row(cp, did)
    assert row is not None and row["tier"] is None and row["online"] is True
    stored = _scalars(
        cp, select(TelemetryRow).where(TelemetryRow.device_id == did, TelemetryRow.seq == 7)
    )[0]
    assert stored.cpu_percent == 7.0
    assert stored.inference[0]["tokens"] == 90


def test_events_keep_their_code_in_both_forms(start_cp: StartCP, device) -> None:
    """A new-form event's code is stored as sent; an old-form one (no code
    field) gets the code its reason names, and none when it names none."""
    cp = start_cp()
    dev = device("codes")
    did = dev.device_id
    _send(dev, event(did, 1, "rejected", code=p.EventCode.INSUFFICIENT_RAM,
                     reason="insufficient_ram: needs 2 GiB"))
    for seq, reason in ((2, "does_not_fit: 300 MB free"), (3, "no code: here")):
        old = json.loads(p.encode(event(did, seq, "rejected", reason=reason)))
        old["schema"] = "slmfleet.event/1"
        topic = p.device_topic(did, p.TopicKind.EVENTS)
        assert not dev.publish(topic, json.dumps(old).encode()).is_failure
    wait_until(lambda: _count(cp, DeviceEvent, did) == 3, 5, "three events")
    assert cp.engine is not None
    with cp.engine.connect() as conn:
        raw = conn.execute(
            text("SELECT seq, code FROM device_events WHERE device_id = :d ORDER BY seq"),
            {"d": did},
        ).all()
    assert [tuple(r) for r in raw] == [(1, "insufficient_ram"), (2, "does_not_fit"), (3, None)]


def test_events_are_stored_once_per_device_and_seq(start_cp: StartCP, device) -> None:
    cp = start_cp()
    dev = device("events")
    did = dev.device_id

    def stored() -> list[tuple[int, str]]:
        return [
            (e.seq, e.type)
            for e in _scalars(
                cp,
                select(DeviceEvent).where(DeviceEvent.device_id == did).order_by(DeviceEvent.seq),
            )
        ]

    first = event(did, 1, "downloading", assignment_id="as-1", progress_pct=10.0)
    _send(dev, first)
    wait_until(lambda: stored() == [(1, "downloading")], 5, "first event")
    # a redelivery in a later batch, and a different payload reusing seq 1
    _send(dev, first)
    _send(dev, event(did, 1, "failed", reason="reused seq"))
    _send(dev, event(did, 2, "verified"))
    # duplicates back to back, most likely in one batch
    third = event(did, 3, "staged")
    for _ in range(3):
        _send(dev, third)
    _send(dev, event(did, 4, "activated"))
    # One connection, QoS 1, one writer: seq 4 landing means all before it did.
    wait_until(lambda: (4, "activated") in stored(), 5, "last event")
    assert stored() == [(1, "downloading"), (2, "verified"), (3, "staged"), (4, "activated")]
    (row,) = _scalars(
        cp, select(DeviceEvent).where(DeviceEvent.device_id == did, DeviceEvent.seq == 1)
    )
    assert (row.assignment_id, row.progress_pct, row.reason) == ("as-1", 10.0, None)

    # the same seq from another device is another event
    other = device("events")
    _send(other, event(other.device_id, 1, "received"))
    wait_until(lambda: _count(cp, DeviceEvent, other.device_id) == 1, 5, "other device's event")
    assert _count(cp, DeviceEvent, did) == 4


# -- liveness ----------------------------------------------------------------------


def test_retained_replay_fills_the_registry_but_is_not_liveness(start_cp: StartCP, device) -> None:
    dev = device("retained")
    did = dev.device_id
    hello_topic = p.device_topic(did, p.TopicKind.HELLO)
    state_topic = p.device_topic(did, p.TopicKind.STATE)
    try:
        # published while no control plane listens: only the broker's store has them
        _send(dev, hello(did, labels={"kept": "yes"}), retain=True)
        _send(dev, state(did, online=True), retain=True)
        cp = start_cp()
        row = wait_until(lambda: (r := _row(cp, did)) and r["online"] and r, 5, "replayed state")
        assert row["tier"] == "micro" and row["labels"] == {"kept": "yes"}
        assert row["last_seen"] is None  # a replay is old news
        assert httpx.get(
            f"{cp.api_url}/v1/devices/{did}",
            headers=ADMIN_HEADERS
        ).json()["last_seen"] is None

        before = time.time()
        _send(dev, telemetry(did, 0))
        row = wait_until(lambda: (r := _row(cp, did)) and r["last_seen"] and r, 5, "live message")
        assert row["last_seen"] >= before
    finally:
        # clear the retained messages so later control planes don't replay them
        dev.publish(hello_topic, b"", retain=True)
        dev.publish(state_topic, b"", retain=True)


def test_offline_state_and_last_will_flip_the_device_offline(
    start_cp: StartCP, broker, new_device
) -> None:
    cp = start_cp()
    did = f"will-{secrets.token_hex(3)}"
    dev = RawClient(broker.url, did, new_device(did))
    will = p.encode(state(did, online=False))
    dev.client.will_set(p.device_topic(did, p.TopicKind.STATE), will, qos=1)
    assert not dev.connect().is_failure
    try:
        _send(dev, state(did, online=True))
        row = wait_until(lambda: (r := _row(cp, did)) and r["online"] and r, 5, "online")

        _send(dev, state(did, online=False))
        row = wait_until(lambda: (r := _row(cp, did)) and not r["online"] and r, 5, "offline")
        went_offline = row["state_changed_at"]

        _send(dev, telemetry(did, 1))  # a heartbeat brings it back
        row = wait_until(lambda: (r := _row(cp, did)) and r["online"] and r, 5, "online again")
        assert row["state_changed_at"] > went_offline
        last_seen = row["last_seen"]
    finally:
        # "disconnect with Will Message": the broker publishes the will, as on a crash
        dev.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        dev.client.loop_stop()
    row = wait_until(lambda: (r := _row(cp, did)) and not r["online"] and r, 5, "will")
    # the will is the broker speaking: no evidence the device was alive
    assert row["last_seen"] == last_seen


def test_liveness_job_marks_a_silent_device_offline(start_cp: StartCP, device) -> None:
    cp = start_cp(heartbeat_interval_s=0.4, offline_after_missed=2, liveness_check_interval_s=0.1)
    quiet, chatty = device("quiet"), device("chatty")
    for dev in (quiet, chatty):
        _send(dev, hello(dev.device_id))
    for dev in (quiet, chatty):
        wait_until(lambda d=dev: (r := _row(cp, d.device_id)) and r["online"], 5, "online")
    heard = _row(cp, quiet.device_id)["last_seen"]

    seq = 0
    deadline = time.monotonic() + 5.0
    while _row(cp, quiet.device_id)["online"]:
        assert time.monotonic() < deadline, "silent device never marked offline"
        seq += 1
        _send(chatty, telemetry(chatty.device_id, seq))
        time.sleep(0.1)
    row = _row(cp, quiet.device_id)
    assert row["last_seen"] == heard
    assert row["state_changed_at"] - heard >= 0.8  # two missed heartbeats of 0.4 s
    assert _row(cp, chatty.device_id)["online"] is True  # heard every 0.1 s

    _send(quiet, telemetry(quiet.device_id, 1))
    wait_until(lambda: _row(cp, quiet.device_id)["online"], 5, "back online")


# -- bad input ---------------------------------------------------------------------


def test_bad_payloads_are_counted_by_reason_and_good_ones_still_land(
    start_cp: StartCP, device, broker, cp_credentials
) -> None:
    cp = start_cp()
    dev = device("noisy")
    did = dev.device_id
    topic = p.device_topic(did, p.TopicKind.TELEMETRY)
    # The replay of other tests' retained messages comes before this one on
    # the control plane's connection, so once it lands the counters are quiet.
    _send(dev, telemetry(did, 0))
    wait_until(lambda: _telemetry_seqs(cp, did) == [0], 5, "first heartbeat")
    assert cp.ingest is not None and cp.ingest.flush(5)
    rejected_before = dict(cp.ingest.stats().rejected)
    metrics_before = _metrics(cp)

    good = json.loads(p.encode(telemetry(did, 1)))
    bad = {
        "malformed": b'{"schema": "slmfleet.telemetry/1", "device_id": ',
        "too_large": json.dumps({**good, "active_model": "x" * p.MAX_PAYLOAD_BYTES}).encode(),
        "wrong_schema": p.encode(state(did, online=True)),
        "id_mismatch": p.encode(telemetry("someone-else", 1)),
        # a clock three days ahead: refused (the device still counts as heard)
        "clock_skew": p.encode(telemetry(did, 2, ts=time.time() + 3 * 86400)),
        "empty": b"",
    }
    for payload in bad.values():
        assert not dev.publish(topic, payload).is_failure
    # a topic no device id can have; only the control plane's user may write it
    cp_client = RawClient(broker.url, *cp_credentials)
    assert not cp_client.connect().is_failure
    try:
        assert not cp_client.publish(f"{p.TOPIC_ROOT}/Not_A_Device/telemetry", b"{}").is_failure
    finally:
        cp_client.close()
    _send(dev, telemetry(did, 1))

    expected = dict.fromkeys([*bad, "bad_topic"], 1)

    def delta() -> dict[str, int]:
        now = cp.ingest.stats().rejected  # type: ignore[union-attr]
        return {
            k: v - rejected_before.get(k, 0)
            for k, v in now.items()
            if v != rejected_before.get(k, 0)
        }

    wait_until(lambda: delta() == expected, 5, f"rejections {expected}")
    wait_until(lambda: _telemetry_seqs(cp, did) == [0, 1], 5, "the good message after them")

    metrics = _metrics(cp)
    for reason in expected:
        key = ("slmfleet_ingest_rejected_total", (("reason", reason),))
        assert metrics[key] - metrics_before.get(key, 0.0) == 1, reason
    api = httpx.get(f"{cp.api_url}/v1/ingest/stats", headers=ADMIN_HEADERS).json()
    assert api["rejected_total"] == sum(api["rejected"].values())
    assert {k: api["rejected"][k] - rejected_before.get(k, 0) for k in expected} == expected
    assert api["write_errors"] == 0 and api["dropped"] == 0


# -- the database going away ---------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_locked_database_is_reported_and_the_queue_catches_up(start_cp: StartCP, device) -> None:
    """Another process holding SQLite's write lock (a backup, a sqlite3 shell)
    makes every write fail with "database is locked" after the busy timeout.
    The ingest must say so, keep what it received, and write it all later."""
    cp = start_cp()
    assert cp.ingest is not None and cp.engine is not None
    ingest = cp.ingest
    dev = device("dblock")
    did = dev.device_id
    _send(dev, hello(did))
    wait_until(lambda: _row(cp, did), 5, "device row")
    assert ingest.flush(5)
    writer = ingest.writer_pid
    assert writer is not None
    written_before = ingest.stats().written

    lock = sqlite3.connect(cp.engine.url.database, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # takes the write lock, readers go on
        for seq in range(20):
            _send(dev, telemetry(did, seq))
        wait_until(lambda: ingest.stats().write_errors >= 1, 15, "a failed write")
        stats = ingest.stats()
        assert stats.written == written_before
        assert stats.queue_depth >= 20
        assert stats.dropped == 0
        assert httpx.get(
            f"{cp.api_url}/v1/ingest/stats",
            headers=ADMIN_HEADERS
        ).json()["write_errors"] >= 1
        assert _metrics(cp)[("slmfleet_ingest_write_errors_total", ())] >= 1
        # readers are not blocked in WAL mode: the API still answers
        assert httpx.get(f"{cp.api_url}/v1/devices/{did}", headers=ADMIN_HEADERS).status_code == 200
        for seq in range(20, 30):  # more arrive while the database is down
            _send(dev, telemetry(did, seq))
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    wait_until(lambda: len(_telemetry_seqs(cp, did)) >= 30, 15, "the backlog written")
    assert _telemetry_seqs(cp, did) == list(range(30))
    assert ingest.flush(5)
    stats = ingest.stats()
    assert stats.dropped == 0 and stats.queue_depth == 0
    assert stats.rejected.get("db_error", 0) == 0  # nothing was given up as poison
    # the same writer process rode it out: nothing crashed and restarted
    assert ingest.writer_pid == writer
    assert ingest.connected


def test_the_writer_rides_out_postgresql_dropping_its_connections(
    start_cp: StartCP, device, database_backend: str
) -> None:
    """A PostgreSQL restart or failover ends every connection the writer holds.
    The writer does not ping before each batch, so the first write on a dead
    connection fails; it must be retried on a new one, losing nothing."""
    if database_backend != "postgresql":
        pytest.skip("SQLite has no server connections to lose")
    cp = start_cp()
    assert cp.ingest is not None and cp.engine is not None
    ingest = cp.ingest
    dev = device("pgdrop")
    did = dev.device_id
    _send(dev, hello(did))
    for seq in range(10):
        _send(dev, telemetry(did, seq))
    wait_until(lambda: _telemetry_seqs(cp, did) == list(range(10)), 10, "the first ten written")
    writer = ingest.writer_pid

    with cp.engine.connect() as conn:
        dropped = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )).scalar_one()
    assert dropped >= 1  # the writer's connection at least
    for seq in range(10, 20):
        _send(dev, telemetry(did, seq))
    wait_until(lambda: _telemetry_seqs(cp, did) == list(range(20)), 15, "the next ten written")
    assert ingest.flush(5)
    stats = ingest.stats()
    assert stats.dropped == 0 and stats.queue_depth == 0
    assert ingest.writer_pid == writer
