"""The fleet simulator against real Mosquitto and a real control plane's ingest: its
devices are ingested like real ones, and they verify signed assignments with the
agent's own checks and report each step."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

import protocol as p
from agent.profiles import default_profiles_dir, load_profiles
from agent.trust import TrustRoots
from controlplane.db import Device, TelemetryRow
from controlplane.service import ControlPlane
from fleetsim import FleetSimulator, Scenario, load_scenario
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import RawClient
from tests.support.signer import TrustSimulator, make_variant

E = p.EventType


@pytest.fixture
def controlplane(tmp_path: Path, broker, cp_credentials) -> Iterator[ControlPlane]:
    cp = ControlPlane(cp_settings(tmp_path / "cp", broker, cp_credentials))
    cp.start()
    yield cp
    cp.stop()


def _simulator(scenario: Scenario, broker, cp_credentials, trust: TrustRoots | None = None,
               connections: int = 2) -> FleetSimulator:
    # The control plane's user may touch every device topic, as the simulator's must.
    return FleetSimulator(scenario, broker.url, *cp_credentials, trust=trust,
                          profiles=load_profiles(default_profiles_dir()),
                          connections=connections, client_prefix=f"sim-{time.monotonic_ns()}")


def test_simulated_fleet_is_ingested_like_a_real_one(broker, cp_credentials,
                                                    controlplane: ControlPlane) -> None:
    scenario = Scenario(devices=300, id_prefix="simload", heartbeat_s=0.5, ramp_s=0.5)
    sim = _simulator(scenario, broker, cp_credentials)
    by_tier = collections.Counter(d.tier.value for d in sim.devices)
    assert len(by_tier) == 3, "the default boards cover micro, small and medium"

    def tiers_in_db() -> dict[str, int]:
        with controlplane.engine.connect() as conn:
            rows = conn.execute(select(Device.tier, func.count()).where(
                Device.id.like("simload-%")).group_by(Device.tier)).all()
        return {tier: n for tier, n in rows if tier}

    def telemetry_rows() -> int:
        with controlplane.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(TelemetryRow).where(
                TelemetryRow.device_id.like("simload-%"))).scalar_one()

    sim.start()
    try:
        wait_until(lambda: tiers_in_db() == dict(by_tier), 30, "every simulated device ingested")
        wait_until(lambda: telemetry_rows() >= 2 * 300, 30, "two heartbeats per device")
        snap = sim.stats.snapshot()
        assert snap["publish_errors"] == 0
        assert snap["published"]["hello"] == 300
    finally:
        sim.stop()

    def offline() -> int:
        with controlplane.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Device).where(
                Device.id.like("simload-%"), Device.online.is_(False))).scalar_one()

    wait_until(lambda: offline() == 300, 30, "every device offline after a clean stop")


def _watch(broker, cp_credentials, prefix: str) -> RawClient:
    watcher = RawClient(broker.url, *cp_credentials)
    watcher.connect()
    watcher.subscribe(f"{p.TOPIC_ROOT}/+/events")
    watcher.subscribe(f"{p.TOPIC_ROOT}/+/hello")
    return watcher


def _events(watcher: RawClient, device_id: str) -> list[p.Event]:
    topic = p.device_topic(device_id, p.TopicKind.EVENTS)
    return [p.decode(p.TopicKind.EVENTS, m.payload) for m in list(watcher.messages)
            if m.topic == topic]


def test_simulated_devices_verify_and_act_on_signed_assignments(broker, cp_credentials) -> None:
    trust = TrustSimulator()
    scenario = Scenario(
        devices=4, id_prefix="simact", heartbeat_s=60, ramp_s=0,
        boards={"raspberry-pi-4-4gb": 1},
        tiers={p.Tier.MICRO: {"download_bytes_per_s": 1e9, "health_check_s": 0.05}},
        releases={"m@2.0.0": {"health_fail_rate": 1.0}},
    )
    sim = _simulator(scenario, broker, cp_credentials, TrustRoots(trust.release_keys,
                                                                    trust.director_keys))
    good = trust.release("m", "1.0.0", variants={p.Tier.MICRO: make_variant(p.Tier.MICRO)})
    bad = trust.release("m", "2.0.0", variants={p.Tier.MICRO: make_variant(p.Tier.MICRO)})
    too_big = trust.release("m", "3.0.0", variants={p.Tier.MEDIUM: make_variant(p.Tier.MEDIUM)})
    watcher = _watch(broker, cp_credentials, "simact")
    control = RawClient(broker.url, *cp_credentials)
    control.connect()
    sim.start()
    try:
        ok, failing, forged, wrong_tier = (d.device_id for d in sim.devices)
        trust.now = time.time()
        control.publish(p.device_topic(ok, p.TopicKind.DESIRED), trust.assign(ok, good))
        control.publish(p.device_topic(failing, p.TopicKind.DESIRED), trust.assign(failing, bad))
        # Signed, but for another device: refused, as the agent refuses it.
        control.publish(p.device_topic(forged, p.TopicKind.DESIRED), trust.assign(ok, good))
        control.publish(p.device_topic(wrong_tier, p.TopicKind.DESIRED),
                        trust.assign(wrong_tier, too_big, p.Tier.MEDIUM))

        wait_until(lambda: [e.type for e in _events(watcher, ok)][-1:] == [E.ACTIVATED], 15,
                   "activation")
        assert [e.type for e in _events(watcher, ok)] == [
            E.RECEIVED, E.VERIFIED, E.FIT_CHECKED, E.DOWNLOADING, E.STAGED, E.HEALTH_PASSED,
            E.ACTIVATED]
        wait_until(lambda: [e.type for e in _events(watcher, failing)][-1:] == [E.FAILED], 15,
                   "the health failure")
        failed = _events(watcher, failing)
        assert failed[-2].type == E.HEALTH_FAILED and "health_failed" in (failed[-1].reason or "")
        wait_until(lambda: _events(watcher, forged) and _events(watcher, wrong_tier), 15,
                   "the refusals")
        assert _events(watcher, forged)[0].type == E.REJECTED
        assert "wrong_device" in (_events(watcher, forged)[0].reason or "")
        assert _events(watcher, wrong_tier)[0].type == E.REJECTED

        # The device's retained hello carries the new model and the update's end.
        hellos = [p.decode(p.TopicKind.HELLO, m.payload) for m in list(watcher.messages)
                  if m.topic == p.device_topic(ok, p.TopicKind.HELLO)]
        last = hellos[-1]
        assert last.simulated and last.active_model.version == "1.0.0"
        assert last.update.state == p.UpdateState.ACTIVATED
        assert sim.active_versions()["m@1.0.0"] == 1
        assert sim.stats.snapshot()["assignments"]["rejected"] == 2

        # A replay of the same signed assignment changes nothing.
        before = len(_events(watcher, ok))
        control.publish(p.device_topic(ok, p.TopicKind.DESIRED), trust.assign(ok, good))
        wait_until(lambda: len(_events(watcher, ok)) > before, 10, "the replay's refusal")
        assert _events(watcher, ok)[-1].type == E.REJECTED
        assert "replay" in (_events(watcher, ok)[-1].reason or "")
    finally:
        sim.stop()
        control.close()
        watcher.close()


def test_scenario_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("devices: 0\nboards: {no-such-board: 1}\n")
    with pytest.raises(ValueError) as exc:
        load_scenario(path)
    assert str(path) in str(exc.value) and "devices" in str(exc.value)
    assert load_scenario(None, devices=7).devices == 7


def test_cli_runs_a_fleet_for_a_while_and_prints_a_summary(broker, cp_credentials) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "slmfleet", "simulate", "--broker", broker.url,
         "--username", cp_credentials[0], "--password", cp_credentials[1], "--devices", "50",
         "--heartbeat", "0.5", "--ramp", "0.2", "--duration", "2", "--output", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["devices"] == 50
    assert summary["published"]["hello"] == 50
    assert summary["published"]["telemetry"] >= 50
    assert summary["publish_errors"] == 0
