"""An adapter release rolled out canary-first to three real agents serving the real base.

A control plane, the shared broker, three agents (micro, small and medium
tier) with ``smollm2-135m@1.1.0`` active; ``support-formal@1.0.0`` (the real
LoRA adapter, one ``gguf-lora`` variant per tier bound to the base's sha256)
is published with ``slmfleet models publish``'s code path and rolled out in
two stages. Afterwards every agent answers ``smollm2-135m+support-formal``
with the adapter's word and ``smollm2-135m`` with the base's answer, while
chat traffic on the base failed no request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.client import publish_release
from controlplane.devfleet.demo_specs import demo_release_spec
from controlplane.devfleet.fleet import ensure_dev_keys
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.adapters import BuiltAdapter, built_adapter, chat_answer
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import provision_device
from tests.support.rollout_agents import FleetAgent, LoadDriver, start_agents
from tests.support.updates import file_sha256

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BASE, ADAPTER = "smollm2-135m", "support-formal"
LABEL = {"suite": "adapter-e2e"}
PRESETS = ["raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "x86_64-gpu-workstation"]


def _adapter_spec(adapter: BuiltAdapter, base_sha: str) -> dict[str, Any]:
    variant = {
        "file": str(adapter.path), "format": "gguf-lora", "parameters": 460_000,
        "context_length": 8192,
        "health_check": {"max_ttft_ms": 60_000, "golden_prompts": [
            {"prompt": adapter.prompt, "expected": [adapter.expected], "max_tokens": 16}]},
    }
    return {"name": ADAPTER, "version": "1.0.0",
            "description": "formal greetings (LoRA on smollm2-135m)",
            "adapter_of": {"name": BASE, "versions": ">=1.1.0,<2.0.0",
                           "sha256": dict.fromkeys(("micro", "small", "medium"), base_sha)},
            "variants": dict.fromkeys(("micro", "small", "medium"), variant)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker,
          cp_credentials: tuple[str, str], model_path: Path
          ) -> Iterator[tuple[httpx.Client, list[FleetAgent], BuiltAdapter]]:
    root = tmp_path_factory.mktemp("adapter-e2e")
    adapter = built_adapter(model_path)
    keys = ensure_dev_keys(root / "keys")
    cp = ControlPlane(cp_settings(
        root / "cp", broker, cp_credentials, release_keys_file=keys.release_keys_file,
        director_keys_file=keys.director_keys_file, director_key_files=[keys.director_key],
    ), rollout_tick_s=0.5).start()
    agents = start_agents(
        root / "agents", broker.url, lambda d: provision_device(broker, d),
        [(f"lora-e2e-{i}", preset) for i, preset in enumerate(PRESETS)],
        labels=LABEL, heartbeat_interval_s=1.0, health_check_timeout_s=180.0,
        release_keys_file=str(keys.release_keys_file),
        director_keys_file=str(keys.director_keys_file),
    )
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=60)
    try:
        specs = {f"{BASE}-1.1.0": demo_release_spec(model_path, "1.1.0", name=BASE),
                 f"{ADAPTER}-1.0.0": _adapter_spec(adapter, file_sha256(model_path))}
        for stem, spec in specs.items():
            (root / f"{stem}.yaml").write_text(yaml.safe_dump(spec))
            publish_release(root / f"{stem}.yaml", [keys.release_key], cp.api_url, ADMIN_TOKEN)
        wait_until(lambda: all(
            api.get(f"/v1/devices/{a.device_id}").status_code == 200
            and api.get(f"/v1/devices/{a.device_id}").json()["assignment_form"] == "set"
            for a in agents), 90, "every agent online, speaking the set form", poll=0.5)
        yield api, agents, adapter
    finally:
        for agent in agents:
            agent.process.stop()
        api.close()
        cp.stop()


def _serving(api: httpx.Client, agents: list[FleetAgent], name: str, version: str) -> bool:
    for agent in agents:
        entry = api.get(f"/v1/devices/{agent.device_id}").json()["models"].get(name)
        if not entry or (entry["version"], entry["state"]) != (version, "serving"):
            return False
    return True



def test_an_adapter_rolls_out_canary_first_and_serves_beside_its_base(world) -> None:
    api, agents, adapter = world
    devices = [a.device_id for a in agents]
    r = api.post("/v1/devices/*/assignment", json={
        "model": BASE, "version": "1.1.0", "selector": {"device_ids": devices}})
    assert r.status_code == 200, r.text
    wait_until(lambda: _serving(api, agents, BASE, "1.1.0"), 300, "the base everywhere",
               poll=1.0)
    wait_until(lambda: all(a.api_url() for a in agents), 60, "every local API", poll=0.5)

    chats = LoadDriver(lambda: agents, BASE, max_requests=300, max_seconds=600,
                       max_tokens=8).start()
    try:
        r = api.post("/v1/rollouts", json={
            "model": ADAPTER, "version": "1.0.0", "target": {"labels": LABEL},
            "stages": [{"percent": 34, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
            "gates": {"min_devices_reporting": 1, "max_failed": 0},
            "on_failure": "rollback", "max_concurrent_downloads": 1,
        })
        assert r.status_code == 201, r.text
        rollout_id = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            detail = api.get(f"/v1/rollouts/{rollout_id}").json()
            return detail if detail["state"] in ("completed", "rolled_back", "paused") else None

        detail = wait_until(finished, 600, "the adapter's rollout to finish", poll=1.0)
        assert detail["state"] == "completed", [(t["kind"], t["reason"])
                                                for t in detail["timeline"]]
        wait_until(lambda: _serving(api, agents, ADAPTER, "1.0.0"), 120,
                   "the adapter serving everywhere", poll=1.0)
    finally:
        chats.stop()

    # Canary first: the first stage took part of the fleet, the second the rest.
    by_stage = sorted(m["stage"] for m in detail["devices"])
    assert by_stage[0] == 1 and by_stage[-1] == 2, detail["devices"]
    assert {m["state"] for m in detail["devices"]} == {"succeeded"}, detail["devices"]
    assert chats.errors == [], chats.errors[:5]
    for agent in agents:
        url = agent.api_url()
        status, adapted = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
        assert status == 200 and adapter.expected.lower() in adapted.lower(), adapted
        status, plain = chat_answer(url, BASE, adapter.prompt)
        assert status == 200 and adapter.expected.lower() not in plain.lower(), plain
        models = api.get(f"/v1/devices/{agent.device_id}").json()["models"]
        assert models[BASE]["version"] == "1.1.0"  # the base was left alone
