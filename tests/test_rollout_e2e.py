"""Rollouts end to end: 20 real agents running the real SmolLM2-135M GGUF.

Twenty ``slmfleet agent run`` processes with SIMULATED hardware presets
(they share this machine and one model file): five Jetson Orin Nanos and
four Raspberry Pi 5s (tier small), nine x86 GPU workstations (tier medium)
and two Raspberry Pi 4s (tier micro). Each release has a small and a medium
variant only, so the two Pi 4s are incompatible with all of them. In order:

1. smollm2@1.0.0 (Q4_1) through stages of 10, 50 and 100 %: every
   compatible device runs its tier's variant; the Pi 4s are listed
   ``incompatible`` and never get an assignment.
2. smollm2@1.1.0: the same model with F32 weights. It passes its health
   check but decodes at about half the tokens/s of 1.0.0 on this machine.
   Chat requests are sent to the canary devices and to devices of the same
   tiers still on 1.0.0 during the bake, so both sides report real
   inference figures; the tokens/s gate fails at the canary.
3. smollm2@1.2.0: a golden prompt the model answers wrongly, so the
   canary devices fail their health check on the device.

Releases 2 and 3 must stop at the first stage: only the canary cohort ever
gets an assignment of them, and the control plane sends the canary devices
back to 1.0.0 within two engine ticks of the failed gate (they then
activate it).

The agents start once for the module; each test that needs 1.0.0 everywhere
first makes sure the good rollout ran.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from controlplane.client import publish_release
from controlplane.db.models import AssignmentRecord
from controlplane.devfleet.fleet import DevKeys, ensure_dev_keys
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings
from tests.support.mqtt import provision_device
from tests.support.rollout_agents import FleetAgent, LoadDriver, f32_copy, start_agents
from tests.support.rollout_runs import poll as _poll
from tests.support.rollout_runs import run_rollout as _run

TICK_S = 0.5
MODEL = "smollm2"
LABEL = {"suite": "rollout-e2e"}
PASSING = [{"prompt": "What is 2 + 2?", "expected": ["4", "four"], "max_tokens": 24}]
#: SmolLM2-135M reliably answers "L'Étoile, la Marseillaise, ..."
FAILING = [{"prompt": "What is the capital of France?", "expected": ["paris"], "max_tokens": 32}]
PRESETS = (["jetson-orin-nano-8gb"] * 5 + ["raspberry-pi-5-8gb"] * 4
           + ["x86_64-gpu-workstation"] * 9 + ["raspberry-pi-4-4gb"] * 2)
TIER_OF = {"jetson-orin-nano-8gb": "small", "raspberry-pi-5-8gb": "small",
           "x86_64-gpu-workstation": "medium", "raspberry-pi-4-4gb": "micro"}
COMPATIBLE = sum(TIER_OF[p] != "micro" for p in PRESETS)
#: ceil(10 % of the compatible devices): the first stage of every rollout here
CANARY = math.ceil(COMPATIBLE * 10 / 100)


@dataclass
class World:
    """The control plane, the agents and what has been rolled out so far."""

    cp: ControlPlane
    api: httpx.Client
    agents: dict[str, FleetAgent]
    good_rollout: dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _release(directory: Path, model: Path, version: str, prompts: list[dict[str, Any]],
             quantization: str = "Q4_1") -> Path:
    def variant() -> dict[str, Any]:
        return {
            "file": str(model), "format": "gguf", "quantization": quantization,
            "parameters": 135_000_000, "context_length": 8192,
            "runtime_defaults": {"context": 1024},
            # Loose speed limits: 20 agents and their checks share two cores.
            "health_check": {"max_ttft_ms": 60000, "min_tokens_per_s": 0.1,
                             "golden_prompts": prompts},
        }

    path = directory / f"release-{version}.yaml"
    path.write_text(yaml.safe_dump({"name": MODEL, "version": version,
                                    "variants": {"small": variant(), "medium": variant()}}))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker,
          cp_credentials: tuple[str, str], model_path: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("rollout-e2e")
    keys: DevKeys = ensure_dev_keys(root / "keys")
    cp = ControlPlane(cp_settings(
        root / "cp", broker, cp_credentials, release_keys_file=keys.release_keys_file,
        director_keys_file=keys.director_keys_file, director_key_files=[keys.director_key],
    ), rollout_tick_s=TICK_S).start()
    agents = start_agents(
        root / "agents", broker.url, lambda d: provision_device(broker, d),
        [(f"e2e-ro-{i:02d}", preset) for i, preset in enumerate(PRESETS)],
        labels=LABEL, heartbeat_interval_s=1.0, health_check_timeout_s=180.0,
        log_level="INFO", release_keys_file=str(keys.release_keys_file),
        director_keys_file=str(keys.director_keys_file),
    )
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=60)
    try:
        # Published while the agents start: hashing and uploading overlap their start-up.
        slow = f32_copy(model_path, root / "SmolLM2-135M-Instruct.F32.gguf")
        for version, model, prompts, quant in (("1.0.0", model_path, PASSING, "Q4_1"),
                                               ("1.1.0", slow, PASSING, "F32"),
                                               ("1.2.0", model_path, FAILING, "Q4_1")):
            publish_release(_release(root, model, version, prompts, quant), [keys.release_key],
                            cp.api_url, ADMIN_TOKEN)

        def all_online() -> bool:
            items = api.get("/v1/devices", params={"label": "suite=rollout-e2e",
                                                   "limit": 100}).json()["items"]
            return len([d for d in items if d["online"] and d["tier"]]) == len(PRESETS)

        _poll(all_online, 60, "every agent online with its tier")
        yield World(cp, api, {a.device_id: a for a in agents})
    finally:
        for agent in agents:
            agent.process.stop()
        api.close()
        cp.stop()


def _good_release_everywhere(world: World) -> dict[str, Any]:
    if world.good_rollout is None:
        world.good_rollout = _run(world.api, {
            "model": MODEL, "version": "1.0.0", "target": {"labels": LABEL},
            "stages": [{"percent": 10, "bake_s": 1}, {"percent": 50, "bake_s": 1},
                       {"percent": 100, "bake_s": 1}],
            # Spares the two cores: each download ends in a model load and a health check.
            "max_concurrent_downloads": 3,
        }, timeout=240)
    return world.good_rollout


def _issued(world: World, ref: str) -> list[Any]:
    assert world.cp.engine is not None
    with world.cp.engine.connect() as conn:
        return list(conn.execute(
            select(AssignmentRecord.device_id, AssignmentRecord.rollout_id,
                   AssignmentRecord.issued_at, AssignmentRecord.kind)
            .where(AssignmentRecord.ref == ref)
        ).all())


def test_good_release_reaches_every_compatible_device_with_its_tier_variant(
    world: World,
) -> None:
    good = _good_release_everywhere(world)
    assert good["state"] == "completed", good["reason"]
    assert good["counts"] == {"succeeded": COMPATIBLE, "incompatible": 2}
    # Stages of 10, 50 and 100 % of the 18 compatible devices: 2, then 9, then 18.
    assert [s["devices"].get("succeeded", 0) for s in good["per_stage"]] == [2, 7, 9]
    members = {m["device_id"]: m for m in good["devices"]}
    for device_id, agent in world.agents.items():
        tier = TIER_OF[agent.preset]
        if tier == "micro":
            assert members[device_id]["state"] == "incompatible"
            assert "no variant at or below tier micro" in members[device_id]["reason"]
            continue
        detail = world.api.get(f"/v1/devices/{device_id}").json()
        active = detail["active_model"]
        assert (active["version"], active["tier"]) == ("1.0.0", tier), device_id
    issued = _issued(world, f"{MODEL}@1.0.0")
    micro = {d for d, a in world.agents.items() if TIER_OF[a.preset] == "micro"}
    assert len(issued) == COMPATIBLE and not micro & {r.device_id for r in issued}


def _assert_stopped_at_the_canary(world: World, detail: dict[str, Any], version: str
                                  ) -> set[str]:
    """Blast radius = the canary; the canary sent back to 1.0.0 within two ticks."""
    assert detail["state"] == "rolled_back", detail["reason"]
    timeline = detail["timeline"]
    assert not [d for d in timeline if d["kind"] == "stage_started"]
    canary = {m["device_id"] for m in detail["devices"] if m["state"] == "rolled_back"}
    assert len(canary) == CANARY
    assert all(m["state"] in ("pending", "incompatible") for m in detail["devices"]
               if m["device_id"] not in canary)
    # No device outside the canary cohort was ever issued the release.
    assert {r.device_id for r in _issued(world, f"{MODEL}@{version}")} == canary
    failed = next(d for d in timeline if d["kind"] == "gate_failed")
    rolled = next(d for d in timeline if d["kind"] == "rolled_back")
    assert rolled["ts"] - failed["ts"] <= 2 * TICK_S
    back = {r.device_id: r.issued_at for r in _issued(world, f"{MODEL}@1.0.0")
            if r.rollout_id == detail["id"]}
    assert set(back) == canary
    assert all(at - failed["ts"] <= 2 * TICK_S for at in back.values()), (back, failed["ts"])

    def all_back() -> bool:
        for device_id in canary:
            got = world.api.get(f"/v1/devices/{device_id}").json()
            update = got.get("update") or {}
            if not (got["active_model"]["version"] == "1.0.0"
                    and update.get("ref") == f"{MODEL}@1.0.0"
                    and update.get("state") == "activated"):
                return False
        return True

    _poll(all_back, 60, "the canary devices running 1.0.0 again")
    return canary


def test_slower_release_stops_at_the_canary_and_is_rolled_back(world: World) -> None:
    _good_release_everywhere(world)
    rollout: dict[str, str] = {}

    cached: dict[str, Any] = {"at": 0.0, "agents": []}

    def targets() -> list[FleetAgent]:
        """The canary devices, and two devices per canary tier still on 1.0.0."""
        if "id" not in rollout:
            return []
        if time.monotonic() - cached["at"] < 2.0:
            return cached["agents"]  # type: ignore[no-any-return]
        # Its own client: this runs on the load thread, beside the test's polling.
        with httpx.Client(base_url=world.cp.api_url, headers=ADMIN_HEADERS, timeout=60) as api:
            members = api.get(f"/v1/rollouts/{rollout['id']}").json()["devices"]
        canary = [m for m in members if m["state"] in ("assigned", "succeeded")]
        tiers = {m["device_tier"] for m in canary}
        chosen = {m["device_id"] for m in canary}
        for tier in sorted(tiers):
            chosen |= set(sorted(m["device_id"] for m in members
                                 if m["device_tier"] == tier and m["state"] == "pending")[:2])
        cached["at"], cached["agents"] = time.monotonic(), [world.agents[d] for d in sorted(chosen)]
        return cached["agents"]  # type: ignore[no-any-return]

    load = LoadDriver(targets, MODEL, max_requests=150, max_seconds=170).start()
    try:
        r = world.api.post("/v1/rollouts", json={
            "model": MODEL, "version": "1.1.0", "target": {"labels": LABEL},
            "stages": [{"percent": 10, "bake_s": 150}, {"percent": 100, "bake_s": 1}],
            "gates": {"min_tokens_per_s_ratio": 0.75, "min_requests": 3},
        })
        assert r.status_code == 201, r.text
        rollout["id"] = r.json()["id"]

        def over() -> dict[str, Any] | None:
            got = world.api.get(f"/v1/rollouts/{rollout['id']}").json()
            return got if got["state"] not in ("active", "rolling_back") else None

        try:
            detail = _poll(over, 180, "the slow release's gate to decide")
        except AssertionError:
            got = world.api.get(f"/v1/rollouts/{rollout['id']}").json()
            raise AssertionError((got["state"], got.get("gates"), load.served,
                                  load.errors[:3])) from None
    finally:
        load.stop()
    assert load.served, load.errors
    failed = next(d for d in detail["timeline"] if d["kind"] == "gate_failed")
    gates = [g for g in failed["details"]["gates"] if g["verdict"] == "fail"]
    assert [g["gate"] for g in gates] == ["min_tokens_per_s_ratio"] * len(gates) and gates
    # Measured on the devices: F32 decodes at well under the 0.75 asked of it.
    assert all(g["measured"] < 0.75 for g in gates), gates
    canary = _assert_stopped_at_the_canary(world, detail, "1.1.0")
    assert all(m["health"] == "passed" for m in detail["devices"]
               if m["device_id"] in canary)


def test_unhealthy_release_stops_at_the_canary_and_is_rolled_back(world: World) -> None:
    _good_release_everywhere(world)
    detail = _run(world.api, {
        "model": MODEL, "version": "1.2.0", "target": {"labels": LABEL},
        "stages": [{"percent": 10, "bake_s": 1}, {"percent": 50, "bake_s": 1},
                   {"percent": 100, "bake_s": 1}],
    }, timeout=180)
    failed = next(d for d in detail["timeline"] if d["kind"] == "gate_failed")
    assert "min_health_pass_rate: measured 0" in failed["reason"]
    canary = _assert_stopped_at_the_canary(world, detail, "1.2.0")
    # The gate fails on the first failed device (max_failed 0), so a second
    # canary device may be rolled back before its own check ends: none passed,
    # and every one that reported failed.
    health = {m["device_id"]: m["health"] for m in detail["devices"] if m["device_id"] in canary}
    assert set(health.values()) <= {"failed", None} and "failed" in health.values(), health
    for device_id in (d for d, verdict in health.items() if verdict == "failed"):
        history = world.api.get(f"/v1/devices/{device_id}/history").json()["items"]
        assert any(h["type"] == "health_failed" for h in history)
