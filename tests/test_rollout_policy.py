"""Rollouts with update windows and update locks, on a clock the test sets.

A real control plane (its rollout engine on :class:`TestClock`), real
Mosquitto with ACLs, and simulated devices that verify every signed set and
honour the policy signed into their entry, judged on the same clock
(:mod:`tests.support.policy_fleet`). The window opens when the test says
so; nothing waits for a real 02:00.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select

import protocol as p
from controlplane.db.models import DesiredDocument
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from slmfleet.app import build_app
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings
from tests.support.policy_fleet import PolicyDevice, TestClock, add_policy_devices
from tests.support.registry import TrustFiles, publish
from tests.support.rollout_fleet import SimFleet, wait_for
from tests.support.signer import TrustSimulator

pytest_plugins = ["tests.support.trust_fixtures", "tests.support.rollout_fixtures"]

TICK_S = 0.2
MODEL = "smollm2-policy"
#: 2026-12-07 02:00 UTC: the activation window of these tests opens then, for an hour
OPENS = datetime(2026, 12, 7, 2, 0, tzinfo=UTC).timestamp()
NIGHTLY = {"cron": "0 2 * * *", "duration_s": 3600, "tz": "UTC"}
#: a window in another zone: 04:00 in Berlin (winter, UTC+1) is 03:00 UTC
BERLIN_FOUR = {"cron": "0 4 * * *", "duration_s": 1800, "tz": "Europe/Berlin"}
BERLIN_OPENS = datetime(2026, 12, 7, 3, 0, tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def clock() -> TestClock:
    return TestClock(OPENS - 1800)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, cp_credentials: Any,
       trust: TrustFiles, sim: TrustSimulator, clock: TestClock) -> Iterator[ControlPlane]:
    settings = cp_settings(tmp_path_factory.mktemp("cp"), broker, cp_credentials,
                           **trust.settings())
    plane = ControlPlane(settings, rollout_tick_s=TICK_S, clock=clock).start()
    with httpx.Client(base_url=plane.api_url, headers=ADMIN_HEADERS) as client:
        for version in ("1.0.0", "1.1.0"):
            publish(client, sim, MODEL, version, (p.Tier.SMALL,))
    yield plane
    plane.stop()


def _devices(api: httpx.Client, fleet: SimFleet, clock: TestClock, n: int,
             prefix: str) -> tuple[dict[str, str], list[PolicyDevice]]:
    labels = {"test": secrets.token_hex(4)}
    devices = add_policy_devices(fleet, prefix, n, labels=labels, clock=clock, model=MODEL,
                                 version="1.0.0")
    wait_for(lambda: len(api.get("/v1/devices", params={
        "label": f"test={labels['test']}", "online": True}).json()["items"]) == n,
        15, "the simulated devices online")
    return labels, devices


def _create(api: httpx.Client, spec: dict[str, Any]) -> str:
    r = api.post("/v1/rollouts", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _detail(api: httpx.Client, rollout_id: str) -> dict[str, Any]:
    r = api.get(f"/v1/rollouts/{rollout_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _until(api: httpx.Client, rollout_id: str, what: str, check: Any,
           timeout: float = 20) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        detail = _detail(api, rollout_id)
        return detail if check(detail) else None

    try:
        return wait_for(ready, timeout, what)  # type: ignore[return-value]
    except AssertionError:
        detail = _detail(api, rollout_id)
        raise AssertionError(f"{what}: {detail['state']} {detail['counts']} "
                             f"{[(d['kind'], d['reason']) for d in detail['timeline']]}"
                             f"\n{detail['devices']}") from None


def _cli(cp: ControlPlane, *args: str) -> str:
    """``slmfleet ARGS`` in-process against ``cp``, as an admin; its output."""
    from typer.testing import CliRunner

    result = CliRunner(env={"COLUMNS": "300"}).invoke(build_app(args[0]), [
        *args, "--server", cp.api_url, "--token", ADMIN_TOKEN])
    assert result.exit_code == 0, result.output
    return result.output


def _signed_entry(cp: ControlPlane, sim: TrustSimulator, device: PolicyDevice) -> p.ModelEntry:
    """The device's stored document, verified afresh as an agent verifies it."""
    assert cp.engine is not None
    with cp.engine.connect() as conn:
        envelope = conn.execute(select(DesiredDocument.envelope).where(
            DesiredDocument.device_id == device.device_id)).scalar_one()
    verified = p.verify_desired(
        envelope.encode(), device_id=device.device_id, release_keys=sim.release_keys,
        director_keys=sim.director_keys, now=time.time(), highest_sequence=0,
        device_tier=p.Tier.SMALL)
    return verified.entries[MODEL].entry


def test_activation_waits_for_its_window_and_the_bake_starts_at_activation(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet, sim: TrustSimulator, clock: TestClock
) -> None:
    clock.set(OPENS - 1800)
    labels, devices = _devices(api, fleet, clock, 4, "win")
    rollout_id = _create(api, {
        "model": MODEL, "version": "1.1.0", "target": {"labels": labels},
        "stages": [{"percent": 50, "bake_s": 600}, {"percent": 100, "bake_s": 0}],
        "activation_window": NIGHTLY})

    # Before the window: the stage's devices download, pass the health check and wait.
    detail = _until(api, rollout_id, "the first stage waiting",
                    lambda d: d["counts"].get("waiting") == 2)
    waiting = [m for m in detail["devices"] if m["state"] == "waiting"]
    assert all(m["reason"].startswith("deferred: activation window opens at 2026-12-07T02:00")
               for m in waiting)
    staged = [d for d in devices if d.device_id in {m["device_id"] for m in waiting}]
    assert all(d.pending[MODEL].phase == "activate" and d.models[MODEL] == "1.0.0"
               for d in staged)
    # The window is inside the signed entry, not beside it.
    for device in staged:
        policy = _signed_entry(cp, sim, device).policy
        assert policy is not None and policy.activation_window == p.Window(**NIGHTLY)
        assert policy.download_window is None and policy.lock_override is None
    # The device view says why it waits and until when.
    view = api.get(f"/v1/devices/{staged[0].device_id}").json()
    assert [(w["model"], w["type"], w["until"]) for w in view["waiting"]] == \
        [(MODEL, "deferred", OPENS)]

    # Waiting is neither failed nor stuck: many ticks later nothing has moved.
    time.sleep(10 * TICK_S)
    detail = _detail(api, rollout_id)
    assert detail["state"] == "active" and detail["stage"] == 1
    assert detail["counts"] == {"waiting": 2, "pending": 2}
    assert detail["bake_started_at"] is None
    assert "bake_started" not in [d["kind"] for d in detail["timeline"]]
    assert {g["gate"]: g["verdict"] for g in detail["gates"]}["min_devices_reporting"] == "wait"

    # The window opens: the devices activate and the stage's bake starts then.
    clock.set(OPENS)
    detail = _until(api, rollout_id, "the bake started",
                    lambda d: d["bake_started_at"] is not None)
    assert detail["bake_started_at"] == OPENS
    assert detail["stage"] == 1
    started = [d for d in detail["timeline"] if d["kind"] == "bake_started"]
    assert len(started) == 1 and started[0]["ts"] == OPENS
    assert all(d.models[MODEL] == "1.1.0" for d in staged)
    time.sleep(5 * TICK_S)
    assert _detail(api, rollout_id)["stage"] == 1  # a 600 s bake, from the opening

    # 600 s after the opening the next stage starts; its devices activate at once.
    clock.set(OPENS + 600)
    detail = _until(api, rollout_id, "completed", lambda d: d["state"] == "completed")
    assert detail["counts"] == {"succeeded": 4}
    assert all(d.models[MODEL] == "1.1.0" for d in devices)


def test_a_download_window_holds_downloads_and_their_slots(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet, clock: TestClock
) -> None:
    clock.set(BERLIN_OPENS - 900)
    labels, devices = _devices(api, fleet, clock, 2, "dl")
    rollout_id = _create(api, {
        "model": MODEL, "version": "1.1.0", "target": {"labels": labels},
        "stages": [{"percent": 100, "bake_s": 0}], "max_concurrent_downloads": 1,
        "download_window": BERLIN_FOUR})

    detail = _until(api, rollout_id, "one device waiting for its download window",
                    lambda d: d["counts"].get("waiting") == 1)
    (waiting,) = [m for m in detail["devices"] if m["state"] == "waiting"]
    assert waiting["reason"] == "waiting_window: download window opens at 2026-12-07T03:00:00Z"
    # It holds its download slot: the other device is not assigned meanwhile.
    time.sleep(5 * TICK_S)
    assert _detail(api, rollout_id)["counts"] == {"waiting": 1, "pending": 1}
    device = next(d for d in devices if d.device_id == waiting["device_id"])
    assert device.pending[MODEL].phase == "download"
    view = api.get(f"/v1/devices/{device.device_id}").json()
    assert view["waiting"][0]["until"] == BERLIN_OPENS

    clock.set(BERLIN_OPENS + 60)
    detail = _until(api, rollout_id, "completed", lambda d: d["state"] == "completed")
    assert detail["counts"] == {"succeeded": 2}


def test_an_operator_overrides_a_held_update_lock(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet, sim: TrustSimulator, clock: TestClock
) -> None:
    clock.set(OPENS + 7200)
    labels, (device,) = _devices(api, fleet, clock, 1, "lock")
    device.lock = ("robot mid-task", time.time())
    rollout_id = _create(api, {
        "model": MODEL, "version": "1.1.0", "target": {"labels": labels},
        "stages": [{"percent": 100, "bake_s": 0}]})
    detail = _until(api, rollout_id, "deferred by the lock",
                    lambda d: d["counts"].get("waiting") == 1)
    assert detail["devices"][0]["reason"] == "deferred: locked: robot mid-task"
    time.sleep(5 * TICK_S)
    assert _detail(api, rollout_id)["state"] == "active"  # not failed, not stuck

    bad = api.post(f"/v1/devices/{device.device_id}/lock-override",
                   json={"model": MODEL, "reason": ""})
    assert bad.status_code == 422
    missing = api.post(f"/v1/devices/{device.device_id}/lock-override",
                       json={"model": "no-such-model", "reason": "x"})
    assert missing.status_code == 404
    # rollouts show and devices show say who waits, and why.
    shown = " ".join(_cli(cp, "rollouts", "show", rollout_id).split())
    assert "waiting on the device: 1 deferred" in shown and "locked: robot mid-task" in shown
    shown = " ".join(_cli(cp, "devices", "show", device.device_id).split())
    assert f"waiting {MODEL}" in shown and "locked: robot mid-task" in shown

    since = time.time()
    done = json.loads(_cli(cp, "devices", "override-lock", device.device_id, MODEL,
                           "--reason", "maintenance: swap now", "--output", "json"))
    assert done["assignment_id"] == detail["devices"][0]["assignment_id"]  # a refresh

    # Signed into the entry, and the device acts on it.
    override = _signed_entry(cp, sim, device).policy.lock_override  # type: ignore[union-attr]
    assert override is not None and override.id == done["override_id"]
    assert override.reason == "maintenance: swap now"
    detail = _until(api, rollout_id, "completed", lambda d: d["state"] == "completed")
    assert detail["counts"] == {"succeeded": 1} and device.models[MODEL] == "1.1.0"

    audit = api.get("/v1/audit", params={"since": since}).json()["items"]
    assert [(a["route"], a["status"]) for a in audit
            if a["path"] == f"/v1/devices/{device.device_id}/lock-override"][-1:] == \
        [("/v1/devices/{device_id}/lock-override", 200)]


def test_a_rollout_policy_is_refused_by_an_agent_that_reads_one_model(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    labels = {"test": secrets.token_hex(4)}
    (old,) = [fleet.add(f"old-{secrets.token_hex(3)}", "small", {}, labels=labels,
                        active=(MODEL, "1.0.0"))]
    wait_for(lambda: api.get(f"/v1/devices/{old.device_id}").status_code == 200
             and api.get(f"/v1/devices/{old.device_id}").json()["online"], 15, "online")
    rollout_id = _create(api, {
        "model": MODEL, "version": "1.1.0", "target": {"labels": labels},
        "stages": [{"percent": 100, "bake_s": 0}], "activation_window": NIGHTLY})
    detail = _until(api, rollout_id, "the old agent left out",
                    lambda d: d["counts"].get("incompatible") == 1)
    assert "no place for it" in detail["devices"][0]["reason"]
    assert old.received == []  # it was never sent a policy it could not read
    assert json.loads(json.dumps(detail["spec"]))["activation_window"]["cron"] == "0 2 * * *"
