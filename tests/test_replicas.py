"""Control-plane replicas on one PostgreSQL database and one broker: the ingest is
split through an MQTT v5 shared subscription and every telemetry message is
stored exactly once, redeliveries included; the leader lease moves the rollout
engine to a surviving replica when the leader is killed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import protocol as p
from agent.profiles import default_profiles_dir, load_profiles
from controlplane.db import TelemetryRow, make_engine, upgrade_to_head
from controlplane.db.models import AssignmentRecord
from controlplane.db.writes import BatchStore, IngestItem
from controlplane.service import ControlPlane
from fleetsim import FleetSimulator, Scenario
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings, telemetry, wait_until
from tests.support.mqtt import RawClient
from tests.support.registry import write_trust
from tests.support.rollout_fleet import Behaviour, SimFleet, start_three_stage_rollout
from tests.support.serve import ServeProcess, write_config
from tests.support.signer import TrustSimulator

GROUP = "slmfleet-cp"
LEASE_S = 3.0
MODEL = "smollm2"
BEHAVIOURS = {"1.0.0": Behaviour(tokens_per_s=80.0), "1.1.0": Behaviour(tokens_per_s=81.0)}


@pytest.fixture
def replicas(tmp_path, broker, cp_credentials, postgres_url) -> Iterator[list[ControlPlane]]:
    started: list[ControlPlane] = []
    try:
        for name in ("a", "b"):
            cp = ControlPlane(cp_settings(
                tmp_path / name, broker, cp_credentials, database_url=postgres_url,
                mqtt_shared_group=GROUP, mqtt_client_id=f"cp-{name}-{time.monotonic_ns()}",
            ))
            started.append(cp.start())
        for cp in started:
            assert cp.ingest.wait_ready(15), "replica not subscribed"
        yield started
    finally:
        for cp in started:
            cp.stop()


def _telemetry_rows(cp: ControlPlane, prefix: str) -> int:
    with cp.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(TelemetryRow).where(
            TelemetryRow.device_id.like(f"{prefix}-%"))).scalar_one()


def test_two_replicas_store_every_message_exactly_once(replicas, broker, cp_credentials) -> None:
    a, b = replicas
    sim = FleetSimulator(Scenario(devices=100, id_prefix="repl", heartbeat_s=0.25, ramp_s=0.2),
                         broker.url, *cp_credentials, trust=None,
                         profiles=load_profiles(default_profiles_dir()), connections=2,
                         client_prefix=f"repl-{time.monotonic_ns()}")
    sim.start()
    try:
        wait_until(lambda: sim.stats.snapshot()["published"].get("telemetry", 0) >= 1000, 30,
                   "1,000 heartbeats sent")
    finally:
        sim.stop()
    sent = sim.stats.snapshot()["published"]["telemetry"]
    wait_until(lambda: _telemetry_rows(a, "repl") >= sent, 30, "every heartbeat stored")
    time.sleep(0.5)  # anything extra would show up now
    assert _telemetry_rows(a, "repl") == sent

    # Both replicas did part of the work: the group split the stream.
    written = [cp.ingest.stats().written for cp in (a, b)]
    assert all(w > 0 for w in written), written

    # A redelivered message (same device, ts and seq) changes nothing, whichever
    # replica it reaches.
    dup = RawClient(broker.url, *cp_credentials)
    dup.connect()
    try:
        # fixed timestamps, near now: the ingest refuses a clock more than a day off
        base = float(int(time.time()))
        again = [telemetry("repl-00", seq, ts=base + seq) for seq in range(1, 21)]
        for _ in range(3):
            for message in again:
                dup.publish(p.device_topic("repl-00", p.TopicKind.TELEMETRY), p.encode(message))
        wait_until(lambda: _telemetry_rows(a, "repl") >= sent + 20, 20, "the new heartbeats")
        time.sleep(0.5)
        assert _telemetry_rows(a, "repl") == sent + 20
    finally:
        dup.close()


def _healthz(api_url: str) -> dict[str, Any]:
    try:
        return httpx.get(f"{api_url}/healthz", timeout=5).json()
    except httpx.HTTPError:
        return {}


def test_leader_killed_mid_rollout_the_other_replica_finishes_it(
    tmp_path: Path, broker, cp_credentials, postgres_url: str,
) -> None:
    """Two `slmfleet controlplane serve` replicas on one PostgreSQL database. The
    leader is SIGKILLed halfway through a stage's bake: the other replica takes
    the lease within one lease period and completes the rollout, with every
    device assigned exactly once and no stage started twice."""
    sim = TrustSimulator()
    trust = write_trust(tmp_path / "keys", sim)
    username, password = cp_credentials
    common: dict[str, Any] = {
        "mqtt_url": broker.url, "mqtt_username": username, "mqtt_password": password,
        "api_port": 0, "ingest_flush_ms": 10, "bootstrap_token": ADMIN_TOKEN,
        "database_url": postgres_url, "mqtt_shared_group": GROUP,
        "rollout_tick_s": 1.0, "leader_lease_s": LEASE_S, **trust.settings(),
    }
    first = ServeProcess(write_config(tmp_path / "a.toml", data_dir=tmp_path / "a", **common))
    second: ServeProcess | None = None
    fleet = SimFleet(broker, sim)
    engine = make_engine(postgres_url)
    try:
        wait_until(lambda: _healthz(first.api_url).get("leader") is True, 10, "a leader")
        second = ServeProcess(write_config(tmp_path / "b.toml", data_dir=tmp_path / "b",
                                           **common))
        assert _healthz(second.api_url)["leader"] is False, "two leaders"

        api = httpx.Client(base_url=first.api_url, headers=ADMIN_HEADERS, timeout=10)
        devices, rollout_id = start_three_stage_rollout(api, fleet, sim, MODEL, BEHAVIOURS,
                                                        "fail", middle_bake_s=8)
        wait_until(lambda: api.get(f"/v1/rollouts/{rollout_id}").json()["counts"].get(
            "succeeded") == 4, 30, "stage 2 installed")
        api.close()

        first.kill()
        killed_at = time.monotonic()
        wait_until(lambda: _healthz(second.api_url).get("leader") is True, 2 * LEASE_S,
                   "the other replica to take over")
        takeover_s = time.monotonic() - killed_at
        # Within one lease period, plus one renewal interval and polling slack.
        assert takeover_s <= LEASE_S + LEASE_S / 4 + 1.0, takeover_s

        api = httpx.Client(base_url=second.api_url, headers=ADMIN_HEADERS, timeout=10)
        done = wait_until(lambda: (d := api.get(f"/v1/rollouts/{rollout_id}").json())[
            "state"] == "completed" and d, 40, "the rollout to complete on the new leader")
        api.close()
        assert done["counts"] == {"succeeded": 8}, done["counts"]
        kinds = [d["kind"] for d in done["timeline"]]
        assert kinds.count("stage_started") == 2 and kinds.count("completed") == 1, kinds
        with engine.connect() as conn:
            assigned = dict(conn.execute(
                select(AssignmentRecord.device_id, func.count())
                .where(AssignmentRecord.rollout_id == rollout_id,
                       AssignmentRecord.kind == "assign")
                .group_by(AssignmentRecord.device_id)).all())
        assert assigned == {d.device_id: 1 for d in devices}, assigned
        for device in devices:
            assert device.active == (MODEL, "1.1.0"), device.device_id
            assert [v.manifest.version for v in device.received] == ["1.1.0"]
    finally:
        fleet.close()
        engine.dispose()
        for proc in (first, second):
            if proc is not None:
                proc.stop()


def test_replicas_writing_the_same_devices_in_any_order_do_not_deadlock(postgres_url: str) -> None:
    """Two replicas' writers get the same devices' messages in opposite orders
    (a shared subscription hands each replica every other message). Both lock
    the device rows in id order, so they wait for each other rather than
    deadlock: PostgreSQL would abort one of a deadlocked pair after a second
    and the batch would have to be written again."""
    engine = make_engine(postgres_url, pool_size=4)
    upgrade_to_head(engine)
    devices = [f"dl-{i:03d}" for i in range(200)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(order: list[str], first_seq: int) -> None:
        store = BatchStore(engine)
        start.wait()
        for round_ in range(15):
            seq = first_seq + 2 * round_
            items = [IngestItem(p.TopicKind.TELEMETRY, telemetry(d, seq), time.time(), False)
                     for d in order]
            try:
                store.write(items)
            except Exception as exc:  # the deadlock surfaces here, unretried
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(devices, 1)),
               threading.Thread(target=writer, args=(devices[::-1], 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(TelemetryRow)).scalar_one()
    engine.dispose()
    assert not errors, errors[0]
    assert rows == 2 * 15 * len(devices)
