"""Staged rollouts against a real control plane, real Mosquitto (ACLs on) and
honest simulated devices that verify every signed assignment they receive.

Each test targets its own devices by a label, so the tests share one control
plane, one broker and one set of registered releases.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select

import protocol as p
from controlplane.db.models import AssignmentRecord
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.rollouts import RolloutSpec
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings
from tests.support.registry import TrustFiles, publish
from tests.support.rollout_fleet import Behaviour, SimDevice, SimFleet, ids, wait_for
from tests.support.signer import TrustSimulator

TICK_S = 0.2
MODEL = "smollm2"
#: what each version does on the simulated devices
BEHAVIOURS = {
    "1.0.0": Behaviour(tokens_per_s=80.0),
    "1.1.0": Behaviour(tokens_per_s=82.0),
    "1.2.0": Behaviour(healthy=False),
    "1.3.0": Behaviour(tokens_per_s=35.0, latency_p95_ms=900.0),
}

# sim, trust; api, fleet
pytest_plugins = ["tests.support.trust_fixtures", "tests.support.rollout_fixtures"]


@pytest.fixture(scope="module")
def cp_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("cp")


def start_cp(cp_dir, broker: MosquittoBroker, cp_credentials: Any, trust: TrustFiles,
             database_url: str | None = None) -> ControlPlane:
    """A control plane in ``cp_dir``; ``database_url`` to reopen an earlier one's database."""
    given = {"database_url": database_url} if database_url else {}
    settings = cp_settings(cp_dir, broker, cp_credentials, **trust.settings(), **given)
    return ControlPlane(settings, rollout_tick_s=TICK_S).start()


@pytest.fixture(scope="module")
def cp(cp_dir, broker: MosquittoBroker, cp_credentials: Any, trust: TrustFiles,
       sim: TrustSimulator, database_backend: str) -> Iterator[ControlPlane]:
    plane = start_cp(cp_dir, broker, cp_credentials, trust)
    with httpx.Client(base_url=plane.api_url, headers=ADMIN_HEADERS) as client:
        tiers = (p.Tier.MICRO, p.Tier.SMALL)
        publish(client, sim, MODEL, "1.0.0", tiers)
        publish(client, sim, MODEL, "1.1.0", (p.Tier.SMALL, p.Tier.MEDIUM))
        publish(client, sim, MODEL, "1.2.0", tiers)
        publish(client, sim, MODEL, "1.3.0", tiers)
    yield plane
    plane.stop()


def _label() -> dict[str, str]:
    return {"test": secrets.token_hex(4)}


def _spec(version: str, labels: dict[str, str], stages: list[dict[str, Any]],
          **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "version": version, "target": {"labels": labels},
            "stages": stages, **extra}


def _join(api: httpx.Client, fleet: SimFleet, device_ids: list[str]) -> None:
    def online() -> bool:
        items = api.get("/v1/devices", params={"limit": 500, "online": True}).json()["items"]
        return set(device_ids) <= {d["id"] for d in items}

    wait_for(online, 15, "simulated devices online")


def _on_1_0_0(
    api: httpx.Client, fleet: SimFleet, tier: str, device_ids: Iterable[str]
) -> tuple[dict[str, str], list[SimDevice]]:
    """Devices of ``tier`` running 1.0.0 under fresh labels, once all are online."""
    labels = _label()
    devices = [fleet.add(device_id, tier, BEHAVIOURS, labels=labels, active=(MODEL, "1.0.0"))
               for device_id in device_ids]
    _join(api, fleet, [d.device_id for d in devices])
    return labels, devices


def _create(api: httpx.Client, spec: dict[str, Any]) -> str:
    r = api.post("/v1/rollouts", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _rollout(api: httpx.Client, rollout_id: str) -> dict[str, Any]:
    r = api.get(f"/v1/rollouts/{rollout_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _wait_state(api: httpx.Client, rollout_id: str, states: set[str], timeout: float = 30
                ) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        detail = _rollout(api, rollout_id)
        return detail if detail["state"] in states else None

    try:
        return wait_for(done, timeout, f"rollout in {states}")  # type: ignore[return-value]
    except AssertionError:
        detail = _rollout(api, rollout_id)
        raise AssertionError(
            f"state {detail['state']}: {[(d['kind'], d['reason']) for d in detail['timeline']]}"
            f"\n{detail['devices']}"
        ) from None


def _assignments(cp: ControlPlane, rollout_id: str) -> dict[str, int]:
    """New assignments (not re-signs) this rollout issued, per device."""
    assert cp.engine is not None
    with cp.engine.connect() as conn:
        rows = conn.execute(
            select(AssignmentRecord.device_id, func.count())
            .where(AssignmentRecord.rollout_id == rollout_id, AssignmentRecord.kind == "assign")
            .group_by(AssignmentRecord.device_id)
        ).all()
    return {d: n for d, n in rows}


def test_good_release_reaches_every_compatible_device_with_its_tier_variant(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    labels = _label()
    tiers = ["micro"] * 4 + ["small"] * 12 + ["medium"] * 8
    devices = [fleet.add(device_id, tier, BEHAVIOURS, labels=labels)
               for device_id, tier in zip(ids("good", len(tiers)), tiers, strict=True)]
    _join(api, fleet, [d.device_id for d in devices])
    rollout_id = _create(api, _spec("1.1.0", labels, [
        {"percent": 10, "bake_s": 0.3}, {"percent": 50, "bake_s": 0.3},
        {"percent": 100, "bake_s": 0.3},
    ]))
    detail = _wait_state(api, rollout_id, {"completed"})

    # 1.1.0 has small and medium variants: micro devices cannot run it.
    for device in devices:
        if device.tier == "micro":
            assert not device.received, device.device_id
            continue
        assert device.active == (MODEL, "1.1.0"), device.device_id
        (got,) = device.received
        assert got.assignment.tier.value == device.tier
        assert got.assignment.rollout_id == rollout_id
    states = {m["device_id"]: m for m in detail["devices"]}
    micro = [d.device_id for d in devices if d.tier == "micro"]
    assert {states[d]["state"] for d in micro} == {"incompatible"}
    assert all("no variant at or below tier micro" in states[d]["reason"] for d in micro)
    assert detail["counts"] == {"succeeded": 20, "incompatible": 4}
    assert detail["per_tier"]["small"] == {"succeeded": 12}
    # Stages of 10, 50 and 100 % of the 20 compatible devices: 2, then 10, then 20.
    assert [s["devices"].get("succeeded", 0) for s in detail["per_stage"]] == [2, 8, 10]
    kinds = [d["kind"] for d in detail["timeline"]]
    assert kinds.count("stage_started") == 2 and kinds[-1] == "completed"
    assert all(n == 1 for n in _assignments(cp, rollout_id).values())


def test_devices_refusing_a_release_as_unfit_are_incompatible_not_failed(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    """The engine reads the code of a rejection: a device whose fit check
    refuses the variant leaves the rollout, and no failure gate counts it."""
    labels = _label()
    unfit = {**BEHAVIOURS, "1.1.0": Behaviour(refuses=p.EventCode.DOES_NOT_FIT)}
    devices = [fleet.add(device_id, "small", unfit if i < 2 else BEHAVIOURS, labels=labels)
               for i, device_id in enumerate(ids("unfit", 4))]
    _join(api, fleet, [d.device_id for d in devices])
    rollout_id = _create(api, _spec("1.1.0", labels, [{"percent": 100, "bake_s": 0.3,
                                                      "gates": {"max_failed": 0}}]))
    detail = _wait_state(api, rollout_id, {"completed", "paused", "rolled_back"})
    assert detail["state"] == "completed", detail["timeline"]
    assert detail["counts"] == {"succeeded": 2, "incompatible": 2}
    states = {m["device_id"]: m for m in detail["devices"]}
    for device in devices[:2]:
        assert states[device.device_id]["state"] == "incompatible"
        assert states[device.device_id]["reason"] == "does_not_fit: simulated"


def test_release_failing_its_health_check_stops_at_the_canary_and_rolls_back(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    labels, _ = _on_1_0_0(api, fleet, "micro", ids("bad", 10))
    rollout_id = _create(api, _spec("1.2.0", labels, [
        {"percent": 10, "bake_s": 0.3}, {"percent": 50, "bake_s": 0.3},
        {"percent": 100, "bake_s": 0.3},
    ]))
    detail = _wait_state(api, rollout_id, {"rolled_back"})

    canary = fleet.received("1.2.0")
    assert len(canary) == 1  # blast radius: ceil(10 % of 10)
    assert set(_assignments(cp, rollout_id)) == canary
    (device_id,) = canary
    device = fleet.devices[device_id]
    # Back on 1.0.0 through a new, higher-sequence assignment.
    wait_for(lambda: [v for v in device.received if v.manifest.version == "1.0.0"], 10,
             "the rollback assignment")
    bad, back = device.received
    assert back.assignment.sequence > bad.assignment.sequence
    assert device.active == (MODEL, "1.0.0")

    timeline = detail["timeline"]
    failed = next(d for d in timeline if d["kind"] == "gate_failed")
    assert "max_failed" in failed["reason"] and "min_health_pass_rate" in failed["reason"]
    gates = {g["gate"]: g for g in failed["details"]["gates"]}
    assert gates["min_health_pass_rate"]["measured"] == 0.0
    rolled = next(d for d in timeline if d["kind"] == "rolled_back")
    assert rolled["ts"] - failed["ts"] <= 2 * TICK_S
    assert "1 of 1 reassigned smollm2@1.0.0" in rolled["reason"]
    assert not [d for d in timeline if d["kind"] == "stage_started"]
    # Nobody else ever hears of 1.2.0, however long we wait.
    time.sleep(5 * TICK_S)
    assert fleet.received("1.2.0") == canary


def test_release_slower_than_the_gate_allows_stops_at_the_canary(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    """Healthy on install, but decodes at less than half the old version's tokens/s."""
    labels, _ = _on_1_0_0(api, fleet, "micro", ids("slow", 10))
    rollout_id = _create(api, _spec(
        "1.3.0", labels, [{"percent": 20, "bake_s": 1.5}, {"percent": 100, "bake_s": 0.3}],
        gates={"min_tokens_per_s_ratio": 0.8, "max_p95_latency_ratio": 1.5},
    ))
    detail = _wait_state(api, rollout_id, {"rolled_back"})

    canary = fleet.received("1.3.0")
    assert len(canary) == 2
    failed = next(d for d in detail["timeline"] if d["kind"] == "gate_failed")
    gates = {g["gate"]: g for g in failed["details"]["gates"] if g["verdict"] == "fail"}
    ratio = gates["min_tokens_per_s_ratio"]
    assert ratio["tier"] == "micro" and ratio["threshold"] == 0.8
    assert ratio["measured"] == pytest.approx(35 / 80, rel=0.05)
    assert gates["max_p95_latency_ratio"]["measured"] == pytest.approx(900 / 400, rel=0.05)
    for device_id in canary:
        wait_for(lambda d=device_id: fleet.devices[d].active == (MODEL, "1.0.0"), 10,
                 "the canary back on 1.0.0")
    assert fleet.received("1.3.0") == canary

    # The figures the gate judged are the ones the metrics API serves.
    metrics = api.get(f"/v1/models/{MODEL}/versions/1.3.0/metrics").json()
    micro = next(t for t in metrics["tiers"] if t["tier"] == "micro")
    assert micro["tokens_per_s"] == pytest.approx(35.0) and micro["devices"] >= 2
    one = api.get(f"/v1/devices/{sorted(canary)[0]}/metrics").json()
    assert {(m["model"], m["version"]) for m in one["items"]} >= {(MODEL, "1.3.0")}


def test_paused_rollout_sends_nothing_and_an_offline_device_catches_up(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    labels, devices = _on_1_0_0(api, fleet, "small", ids("pause", 6))
    away = devices[-1]
    away.disconnect()
    wait_for(lambda: not api.get(f"/v1/devices/{away.device_id}").json()["online"], 10,
             "the device offline")
    rollout_id = _create(api, _spec("1.1.0", labels, [
        {"percent": 50, "bake_s": 0.3}, {"percent": 100, "bake_s": 0.3, "approval": True},
    ]))
    detail = _wait_state(api, rollout_id, {"awaiting_approval"})
    first = set(_assignments(cp, rollout_id))
    assert 1 <= len(first) <= 3 and away.device_id not in first

    r = api.post(f"/v1/rollouts/{rollout_id}/pause", json={"reason": "maintenance window"})
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert api.post(f"/v1/rollouts/{rollout_id}/approve").status_code == 409
    time.sleep(6 * TICK_S)
    assert set(_assignments(cp, rollout_id)) == first  # nothing new while paused

    # Operators see the same on /metrics: the stage it waits in, and its devices.
    scraped = api.get("/metrics").text
    assert f'slmfleet_rollout_stage{{model="{MODEL}",rollout="{rollout_id}",state="paused",' \
           'version="1.1.0"} 2.0' in scraped
    assigned = sum(1 for _ in first)
    assert f'slmfleet_rollout_devices{{rollout="{rollout_id}",state="succeeded"}} ' \
           f'{float(assigned)}' in scraped

    assert api.post(f"/v1/rollouts/{rollout_id}/resume").status_code == 200
    # Resumed into the stage it was paused in; it still needs the approval.
    detail = _wait_state(api, rollout_id, {"awaiting_approval"})
    assert set(_assignments(cp, rollout_id)) == first
    assert api.post(f"/v1/rollouts/{rollout_id}/approve").status_code == 200
    detail = _wait_state(api, rollout_id, {"completed"})
    online = {d.device_id for d in devices if d is not away}
    assert set(_assignments(cp, rollout_id)) == online
    pending = {m["device_id"]: m["state"] for m in detail["devices"]}
    assert pending[away.device_id] == "pending"

    away.connect()  # back: it follows the rollout's current stage (100 %)
    wait_for(lambda: away.active == (MODEL, "1.1.0"), 15, "the returning device updated")
    assert _assignments(cp, rollout_id)[away.device_id] == 1
    kinds = [(d["kind"], d["actor"]) for d in _rollout(api, rollout_id)["timeline"]]
    assert ("paused", "operator") in kinds and ("approved", "operator") in kinds


def test_bad_specs_and_actions_get_clear_errors_and_change_nothing(
    cp: ControlPlane, api: httpx.Client
) -> None:
    before = api.get("/v1/rollouts", params={"limit": 500}).json()["items"]
    stage = {"percent": 100, "bake_s": 1}
    cases = [
        (_spec("1.1.0", {"x": "y"}, [{"percent": 50}, {"percent": 20}, stage]),
         "percentages must increase"),
        (_spec("1.1.0", {"x": "y"}, [{"percent": 50}]), "last stage must be 100"),
        (_spec("1.1.0", {"x": "y"}, [stage]) | {"target": {}}, "give at least one of"),
        (_spec("1.1.0", {"x": "y"}, [stage], gates={"min_tokens_per_s": 0.8}),
         "min_tokens_per_s"),
        (_spec("1.1.0", {"x": "y"}, [stage], on_failure="explode"), "on_failure"),
    ]
    for body, needle in cases:
        r = api.post("/v1/rollouts", json=body)
        assert r.status_code == 422, (needle, r.text)
        assert needle in r.text, (needle, r.text)
    r = api.post("/v1/rollouts", json=_spec("9.9.9", {"x": "y"}, [stage]))
    assert r.status_code == 404 and "smollm2@9.9.9 is not registered" in r.text
    assert api.get("/v1/rollouts", params={"limit": 500}).json()["items"] == before

    assert api.get("/v1/rollouts/r-nope").status_code == 404
    assert api.post("/v1/rollouts/r-nope/pause").status_code == 404
    empty = _create(api, _spec("1.1.0", _label(), [stage]))  # matches no device
    assert api.post(f"/v1/rollouts/{empty}/explode").status_code == 422
    r = api.post(f"/v1/rollouts/{empty}/rollback", json={"reason": "x" * 2000})
    assert r.status_code == 422  # reason too long: refused, nothing changed
    assert _rollout(api, empty)["state"] in ("active", "completed")
    assert api.post(f"/v1/rollouts/{empty}/rollback").status_code == 200
    done = _wait_state(api, empty, {"rolled_back"})
    assert "nothing to send back" in done["timeline"][-1]["reason"]
    r = api.post(f"/v1/rollouts/{empty}/resume")
    assert r.status_code == 409 and "it is rolled_back" in r.text
    before = api.get("/v1/rollouts", params={"limit": 500}).json()["items"]

    # Pages: newest first, no overlap, nothing lost.
    seen = []
    cursor = None
    for _ in range(20):
        page = api.get("/v1/rollouts", params={"limit": 2, "cursor": cursor}).json()
        seen += [r["id"] for r in page["items"]]
        cursor = page["next"]
        if not cursor:
            break
    assert seen == [r["id"] for r in before]
    assert api.get("/v1/rollouts", params={"cursor": "garbage"}).status_code == 422
    assert api.get("/v1/devices/nope/metrics").status_code == 404
    assert api.get(f"/v1/models/{MODEL}/versions/9.9.9/metrics").status_code == 404


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slmfleet", "rollouts", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_creates_from_the_example_spec_and_shows_and_steers(
    cp: ControlPlane, tmp_path: Path
) -> None:
    spec = yaml.safe_load((Path(__file__).parents[1] / "examples/rollout.yaml").read_text())
    assert RolloutSpec.model_validate(spec).stages[2].approval  # the example is valid
    spec["target"] = {"labels": _label()}  # no device: nothing happens to the others
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(spec))
    conn = ["--server", cp.api_url, "--token", ADMIN_TOKEN]

    made = _cli("create", "--file", str(path), *conn, "-o", "json")
    assert made.returncode == 0, made.stderr
    rollout_id = json.loads(made.stdout)["id"]
    shown = _cli("show", rollout_id, *conn)
    assert shown.returncode == 0 and "smollm2@1.1.0" in shown.stdout and "stages" in shown.stdout
    listed = _cli("list", *conn, "-o", "json")
    assert rollout_id in {r["id"] for r in json.loads(listed.stdout)}
    paused = _cli("pause", rollout_id, "--reason", "testing", *conn)
    assert paused.returncode == 0 and paused.stdout.strip() == f"{rollout_id}: paused"
    assert _cli("abort", rollout_id, *conn).returncode == 0
    again = _cli("abort", rollout_id, *conn)
    assert again.returncode == 1 and "it is aborted" in again.stderr
    watched = _cli("watch", rollout_id, "--timeout", "10", *conn)
    assert watched.returncode == 0 and f"{rollout_id}: aborted" in watched.stdout
    assert "stages" in watched.stdout and "timeline" in watched.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2\nversion: 1.1.0\nstages: [{percent: 50}]\n")
    refused = _cli("create", "--file", str(bad), *conn)
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr
    missing = _cli("create", "--file", str(tmp_path / "nope.yaml"), *conn)
    assert missing.returncode != 0


def test_restart_mid_rollout_resumes_at_the_right_stage(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet, cp_dir, broker: MosquittoBroker,
    cp_credentials: Any, trust: TrustFiles,
) -> None:
    """Runs last: it replaces the module's control plane with a restarted one."""
    labels, devices = _on_1_0_0(api, fleet, "small", ids("restart", 8))
    rollout_id = _create(api, _spec("1.1.0", labels, [
        {"percent": 25, "bake_s": 8.0}, {"percent": 100, "bake_s": 0.3}]))

    def canary_done() -> bool:
        return _rollout(api, rollout_id)["counts"].get("succeeded") == 2

    wait_for(canary_done, 15, "the canary updated")
    database_url = cp.settings.database_url
    cp.stop()  # mid-bake of stage 1
    before = _assignments_in(database_url, rollout_id)
    assert len(before) == 2

    restarted = start_cp(cp_dir, broker, cp_credentials, trust, database_url)
    try:
        with httpx.Client(base_url=restarted.api_url, headers=ADMIN_HEADERS) as again:
            detail = _rollout(again, rollout_id)
            assert detail["state"] == "active" and detail["stage"] == 1
            detail = _wait_state(again, rollout_id, {"completed"})
        assert detail["counts"] == {"succeeded": 8}
        assignments = _assignments(restarted, rollout_id)
        assert set(assignments) == {d.device_id for d in devices}
        assert set(assignments.values()) == {1}  # nobody assigned twice
        kinds = [d["kind"] for d in detail["timeline"]]
        assert kinds.count("stage_started") == 1 and kinds.count("completed") == 1
        assert all(d.active == (MODEL, "1.1.0") for d in devices)
    finally:
        restarted.stop()


def _assignments_in(database_url: str, rollout_id: str) -> dict[str, int]:
    from controlplane.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(AssignmentRecord.device_id, func.count())
                .where(AssignmentRecord.rollout_id == rollout_id)
                .group_by(AssignmentRecord.device_id)
            ).all()
        return {d: n for d, n in rows}
    finally:
        engine.dispose()
