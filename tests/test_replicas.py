"""Two control-plane replicas on one PostgreSQL database and one broker: the ingest
is split through an MQTT v5 shared subscription and every telemetry message is
stored exactly once, redeliveries included."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

import protocol as p
from agent.profiles import default_profiles_dir, load_profiles
from controlplane.db import TelemetryRow
from controlplane.fleetsim import FleetSimulator, Scenario
from controlplane.service import ControlPlane
from tests.support.controlplane import cp_settings, telemetry, wait_until
from tests.support.mqtt import RawClient

GROUP = "slmfleet-cp"


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
        again = [telemetry("repl-00", seq, ts=1_700_000_000.0 + seq) for seq in range(1, 21)]
        for _ in range(3):
            for message in again:
                dup.publish(p.device_topic("repl-00", p.TopicKind.TELEMETRY), p.encode(message))
        wait_until(lambda: _telemetry_rows(a, "repl") >= sent + 20, 20, "the new heartbeats")
        time.sleep(0.5)
        assert _telemetry_rows(a, "repl") == sent + 20
    finally:
        dup.close()
