"""A control plane and real agents for the end-to-end fleet tests.

:func:`running_fleet` starts a control plane on SQLite with dev release and
director keys, one ``slmfleet agent run`` process per device (simulated
hardware presets, the session's broker) and an admin API client, and
waits until every agent is online with its tier and speaks the set form.

``three_agents`` is one such fleet (micro, small and medium tier) for each
test module that uses it (the model-set and adapter rollout tests). Use with
``pytest_plugins = ["tests.support.fleet_e2e"]``. Each test that uses it
leaves it as it found it in what the next one checks (a test that adds a
model takes it off again), so the order the tests run in does not matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.client import publish_release
from controlplane.devfleet.fleet import DevKeys, ensure_dev_keys
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.adapters import BuiltAdapter
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import provision_device
from tests.support.rollout_agents import FleetAgent, start_agents

#: the shared fleet's presets: one device per tier (micro, small, medium)
PRESETS = ["raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "x86_64-gpu-workstation"]
#: the shared fleet's label (rollouts target it)
FLEET_LABEL = {"suite": "fleet-e2e"}
#: rollout engine tick of the fleets here
TICK_S = 0.5


@dataclass
class Fleet:
    """The control plane, its admin API client, the agents and the release keys."""

    cp: ControlPlane
    api: httpx.Client
    agents: list[FleetAgent]
    keys: DevKeys
    root: Path

    @property
    def device_ids(self) -> list[str]:
        return [a.device_id for a in self.agents]

    def publish(self, spec: dict[str, Any]) -> None:
        """Publish a release spec as ``slmfleet models publish`` does, unless a test
        sharing the fleet published that release already."""
        name, version = spec["name"], spec["version"]
        if self.api.get(f"/v1/models/{name}/versions/{version}").status_code == 200:
            return
        path = self.root / f"{name}-{version}.yaml"
        path.write_text(yaml.safe_dump(spec))
        publish_release(path, [self.keys.release_key], self.cp.api_url, ADMIN_TOKEN)

    def models(self, device_id: str) -> dict[str, Any]:
        """The device's models as ``GET /v1/devices/{id}`` shows them."""
        return self.api.get(f"/v1/devices/{device_id}").json()["models"]

    def serving(self, wanted: dict[str, str]) -> bool:
        """Whether every agent serves each ``name: version`` of ``wanted``."""
        for device_id in self.device_ids:
            models = self.models(device_id)
            for name, version in wanted.items():
                entry = models.get(name)
                if not entry or (entry["version"], entry["state"]) != (version, "serving"):
                    return False
        return True

    def assign(self, model: str, version: str) -> None:
        """Pin ``model@version`` on every agent (one entry each, the rest of their sets kept)."""
        r = self.api.post("/v1/devices/*/assignment", json={
            "model": model, "version": version, "selector": {"device_ids": self.device_ids}})
        assert r.status_code == 200, r.text
        refused = [x for x in r.json()["results"]
                   if x["status"] in ("incompatible", "needs_upgrade", "unknown_device")]
        assert not refused, refused

    def unassign(self, model: str) -> None:
        """Take ``model`` off every agent (their next documents leave it out)."""
        for device_id in self.device_ids:
            r = self.api.delete(f"/v1/devices/{device_id}/assignment/{model}")
            assert r.status_code in (200, 404), r.text


@contextmanager
def running_fleet(root: Path, broker: MosquittoBroker, cp_credentials: tuple[str, str],
                  devices: list[tuple[str, str]], *, labels: dict[str, str],
                  **agent_config: Any) -> Iterator[Fleet]:
    """A control plane and one agent per (device id, preset), all online; stopped on exit."""
    keys = ensure_dev_keys(root / "keys")
    cp = ControlPlane(cp_settings(
        root / "cp", broker, cp_credentials, release_keys_file=keys.release_keys_file,
        director_keys_file=keys.director_keys_file, director_key_files=[keys.director_key],
    ), rollout_tick_s=TICK_S).start()
    agents = start_agents(
        root / "agents", broker.url, lambda d: provision_device(broker, d), devices,
        labels=labels, heartbeat_interval_s=1.0,
        release_keys_file=str(keys.release_keys_file),
        director_keys_file=str(keys.director_keys_file), **agent_config,
    )
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=60)
    try:
        def online(device_id: str) -> bool:
            r = api.get(f"/v1/devices/{device_id}")
            return (r.status_code == 200 and r.json()["online"] and bool(r.json()["tier"])
                    and r.json()["assignment_form"] == "set")

        wait_until(lambda: all(online(d) for d, _ in devices), 90,
                   "every agent online with its tier, speaking the set form", poll=0.5)
        yield Fleet(cp, api, agents, keys, root)
    finally:
        for agent in agents:
            agent.process.stop()
        api.close()
        cp.stop()


@pytest.fixture(scope="module")
def three_agents(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker,
                 cp_credentials: tuple[str, str]) -> Iterator[Fleet]:
    """One fleet of three agents (micro, small, medium) for a test module's tests.

    Per module, not per session: a fleet left running for the rest of the
    suite (three agents and their loaded workers) takes CPU and memory from
    every later test, and the timing-sensitive ones fail.
    """
    with running_fleet(tmp_path_factory.mktemp("fleet-e2e"), broker, cp_credentials,
                       [(f"fleet-{i}", preset) for i, preset in enumerate(PRESETS)],
                       labels=FLEET_LABEL, health_check_timeout_s=180.0) as fleet:
        yield fleet


def adapter_spec(adapter: BuiltAdapter, *, name: str, version: str, base: str,
                 base_sha256: str, versions: str, tiers: list[str],
                 **extra: Any) -> dict[str, Any]:
    """A release spec of the real LoRA adapter bound to ``base`` (that build on each tier)."""
    variant = {
        "file": str(adapter.path), "format": "gguf-lora", "parameters": 460_000,
        "context_length": 8192,
        "health_check": {"max_ttft_ms": 60_000, "golden_prompts": [
            {"prompt": adapter.prompt, "expected": [adapter.expected], "max_tokens": 16}]},
    }
    return {"name": name, "version": version,
            "description": f"formal greetings (LoRA on {base})",
            "adapter_of": {"name": base, "versions": versions,
                           "sha256": dict.fromkeys(tiers, base_sha256)},
            "variants": dict.fromkeys(tiers, variant), **extra}
