"""The fleet simulator's update windows and locks, against a real control plane.

Simulated devices reading signed sets (``sets: true``) with their clock set
so that the rollout's activation window opens 20 s into the run; a quarter
of them hold an app's update lock for an hour. Before the opening every
device is staged and none activated; at the opening the unlocked ones
activate; an operator's lock override, signed into each locked device's
entry, lets the rest through.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

import protocol as p
from agent.profiles import default_profiles_dir, load_profiles
from agent.trust import TrustRoots
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from fleetsim import FleetSimulator, Scenario
from fleetsim.policy import AppLock, hold
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings
from tests.support.registry import TrustFiles, publish
from tests.support.rollout_fleet import wait_for
from tests.support.signer import TrustSimulator

pytest_plugins = ["tests.support.trust_fixtures"]

MODEL = "smollm2-simwin"
OPENS = datetime(2026, 12, 7, 2, 0, tzinfo=UTC).timestamp()
LEAD_S = 20.0
WINDOW = {"cron": "0 2 * * *", "duration_s": 3600, "tz": "UTC"}


def test_hold_judges_windows_locks_and_overrides() -> None:
    rng = random.Random(1)
    policy = p.UpdatePolicy(download_window=p.Window(**WINDOW),
                            activation_window=p.Window(**WINDOW))
    before = hold("download", policy, None, OPENS - 60, rng)
    assert before is not None and before.event is p.EventType.WAITING_WINDOW
    assert before.reason == "download window opens at 2026-12-07T02:00:00Z"
    assert OPENS <= before.retry_at <= OPENS + 1
    assert hold("activate", policy, None, OPENS - 60, rng).event is p.EventType.DEFERRED
    assert hold("activate", policy, None, OPENS + 1, rng) is None
    lock = AppLock("app busy", taken_at=100.0, until=OPENS + 600)
    held = hold("activate", policy, lock, OPENS + 1, rng)
    assert held is not None and held.reason == "locked: app busy" and held.retry_at == lock.until
    assert hold("download", policy, lock, OPENS + 1, rng) is None  # locks hold activation only
    overridden = policy.model_copy(update={"lock_override": p.LockOverride(
        id="o-1", issued_at=101.0, reason="operator")})
    assert hold("activate", overridden, lock, OPENS + 1, rng) is None
    stale = policy.model_copy(update={"lock_override": p.LockOverride(
        id="o-0", issued_at=99.0, reason="before the lock")})
    assert hold("activate", stale, lock, OPENS + 1, rng) is not None


@pytest.fixture
def cp(tmp_path: Any, broker: MosquittoBroker, cp_credentials: Any, trust: TrustFiles,
       sim: TrustSimulator) -> Iterator[ControlPlane]:
    plane = ControlPlane(cp_settings(tmp_path / "cp", broker, cp_credentials,
                                     **trust.settings()), rollout_tick_s=0.2).start()
    with httpx.Client(base_url=plane.api_url, headers=ADMIN_HEADERS) as client:
        publish(client, sim, MODEL, "1.0.0", tuple(p.Tier))
    yield plane
    plane.stop()


def test_simulated_fleet_waits_for_the_window_and_an_override_lifts_locks(
    cp: ControlPlane, broker: MosquittoBroker, cp_credentials: Any, sim: TrustSimulator
) -> None:
    n = 12
    prefix = f"simwin{time.monotonic_ns() % 100_000}"
    start = datetime.fromtimestamp(OPENS - LEAD_S, UTC)
    scenario = Scenario(devices=n, id_prefix=prefix, heartbeat_s=30, ramp_s=0,
                        boards={"raspberry-pi-5-8gb": 1}, labels={"simwin": prefix},
                        sets=True, clock_start=start, seed=7,
                        locks={"fraction": 0.25, "hold_s": 3600, "reason": "robot mid-task"},
                        tiers={t: {"download_bytes_per_s": 1e9, "health_check_s": 0.05}
                               for t in p.Tier})
    fleet = FleetSimulator(scenario, broker.url, *cp_credentials,
                           trust=TrustRoots(sim.release_keys, sim.director_keys),
                           profiles=load_profiles(default_profiles_dir()), connections=1,
                           client_prefix=f"simwin-{time.monotonic_ns()}")
    locked = {d.device_id for d in fleet.devices if d.lock is not None}
    assert 0 < len(locked) < n
    fleet.start()
    opens_at = time.monotonic() + LEAD_S
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=10)
    try:
        wait_for(lambda: len(api.get("/v1/devices", params={
            "label": f"simwin={prefix}", "assignment_form": "set"}).json()["items"]) == n,
            10, "every simulated device's hello/2")
        r = api.post("/v1/rollouts", json={
            "model": MODEL, "version": "1.0.0", "target": {"labels": {"simwin": prefix}},
            "stages": [{"percent": 100, "bake_s": 0}], "activation_window": WINDOW})
        assert r.status_code == 201, r.text
        path = f"/v1/rollouts/{r.json()['id']}"
        wait_for(lambda: api.get(path).json()["counts"] == {"waiting": n},
                 opens_at - time.monotonic() - 1, "every device staged and deferred")
        assert fleet.active_versions()["none"] == n  # nobody activated before the opening

        # The window opens: the unlocked devices activate; the locked ones wait on,
        # now for their lock.
        def locked_wait() -> bool:
            detail = api.get(path).json()
            waiting = {m["device_id"]: m["reason"] for m in detail["devices"]
                       if m["state"] == "waiting"}
            return detail["counts"] == {"succeeded": n - len(locked), "waiting": len(locked)} \
                and waiting == dict.fromkeys(locked, "deferred: locked: robot mid-task")

        wait_for(locked_wait, LEAD_S + 20, "the unlocked devices activated at the opening")

        for device_id in locked:
            r = api.post(f"/v1/devices/{device_id}/lock-override",
                         json={"model": MODEL, "reason": "operator: swap now"})
            assert r.status_code == 200, r.text
        wait_for(lambda: api.get(path).json()["state"] == "completed", 15,
                 "the rollout completed after the overrides")
        assert fleet.active_versions()[f"{MODEL}@1.0.0"] == n
        assert fleet.stats.snapshot()["assignments"]["held_locked"] == len(locked)
    finally:
        api.close()
        fleet.stop()
