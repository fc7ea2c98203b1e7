"""A set of models end to end: three real agents run a chat model and an embedder at once.

Real Mosquitto (ACLs on), a control plane on SQLite, three ``slmfleet agent
run`` processes with simulated hardware presets and the real SmolLM2-135M
GGUF (the embedder is the same file with embeddings on). Each device is
assigned ``smollm2-135m@1.0.0`` and ``smollm2-embed@1.0.0``; both serve
through the local API at once; a canary-first rollout of
``smollm2-135m@1.1.0`` then completes while the official ``openai`` client
keeps asking every device for embeddings (and chat answers), and not one of
those requests fails. The embedder's entry never changes: same release, same
assignment id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from controlplane.client import publish_release
from controlplane.devfleet.demo_specs import demo_release_spec
from controlplane.devfleet.fleet import ensure_dev_keys
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import provision_device
from tests.support.rollout_agents import FleetAgent, LoadDriver, start_agents

CHAT, EMBED = "smollm2-135m", "smollm2-embed"
LABEL = {"suite": "model-sets-e2e"}
PRESETS = ["raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "x86_64-gpu-workstation"]


@dataclass
class World:
    """The control plane, its API client and the agents."""

    cp: ControlPlane
    api: httpx.Client
    agents: list[FleetAgent]


def _publish(root: Path, model: Path, name: str, version: str, **kwargs: Any) -> None:
    spec = root / f"{name}-{version}.yaml"
    spec.write_text(yaml.safe_dump(demo_release_spec(model, version, name=name, **kwargs)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker,
          cp_credentials: tuple[str, str], model_path: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sets-e2e")
    keys = ensure_dev_keys(root / "keys")
    cp = ControlPlane(cp_settings(
        root / "cp", broker, cp_credentials, release_keys_file=keys.release_keys_file,
        director_keys_file=keys.director_keys_file, director_key_files=[keys.director_key],
    ), rollout_tick_s=0.5).start()
    agents = start_agents(
        root / "agents", broker.url, lambda d: provision_device(broker, d),
        [(f"sets-{i}", preset) for i, preset in enumerate(PRESETS)],
        labels=LABEL, heartbeat_interval_s=1.0, health_check_timeout_s=180.0,
        release_keys_file=str(keys.release_keys_file),
        director_keys_file=str(keys.director_keys_file),
    )
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=60)
    try:
        for name, version, extra in ((CHAT, "1.0.0", {}), (CHAT, "1.1.0", {}),
                                     (EMBED, "1.0.0", {"embeddings": True})):
            _publish(root, model_path, name, version, **extra)
            publish_release(root / f"{name}-{version}.yaml", [keys.release_key], cp.api_url,
                            ADMIN_TOKEN)
        wait_until(lambda: all(
            api.get(f"/v1/devices/{a.device_id}").status_code == 200
            and api.get(f"/v1/devices/{a.device_id}").json()["assignment_form"] == "set"
            for a in agents), 90, "every agent online, speaking the set form", poll=0.5)
        yield World(cp, api, agents)
    finally:
        for agent in agents:
            agent.process.stop()
        api.close()
        cp.stop()


def _models(world: World, device_id: str) -> dict[str, Any]:
    return world.api.get(f"/v1/devices/{device_id}").json()["models"]


def _serving(world: World, wanted: dict[str, str]) -> bool:
    for agent in world.agents:
        models = _models(world, agent.device_id)
        for name, version in wanted.items():
            entry = models.get(name)
            if not entry or (entry["version"], entry["state"]) != (version, "serving"):
                return False
    return True


@dataclass
class EmbeddingLoad:
    """The official openai client asking every agent for embeddings, round-robin."""

    agents: list[FleetAgent]
    max_seconds: float = 600.0
    served: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embed-load", daemon=True)

    def start(self) -> EmbeddingLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        clients = [openai.OpenAI(base_url=f"{a.api_url()}/v1", api_key="unused", max_retries=0,
                                 timeout=60) for a in self.agents]
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for agent, client in zip(self.agents, clients, strict=True):
                try:
                    # The client's default encoding (base64), as an app would call it.
                    answer = client.embeddings.create(model=EMBED, input=["kiosk", "shelf"])
                    assert answer.model == f"{EMBED}@1.0.0", answer.model
                    assert len(answer.data) == 2 and len(answer.data[0].embedding) == 576
                    self.served += 1
                except Exception as exc:  # every failure, of any kind, is the finding
                    self.errors.append(f"{agent.device_id}: {exc!r}")
            self._stop.wait(0.05)


def test_a_chat_rollout_completes_while_the_embedder_serves_without_a_failure(
    world: World,
) -> None:
    devices = [a.device_id for a in world.agents]
    for name in (CHAT, EMBED):
        r = world.api.post("/v1/devices/*/assignment", json={
            "model": name, "version": "1.0.0", "selector": {"device_ids": devices}})
        assert r.status_code == 200, r.text
        assert {x["status"] for x in r.json()["results"]} == {"assigned"}, r.json()
    wait_until(lambda: _serving(world, {CHAT: "1.0.0", EMBED: "1.0.0"}), 300,
               "both models serving on every device", poll=1.0)
    embed_before = {d: _models(world, d)[EMBED]["assignment"]["assignment_id"]
                    for d in devices}

    def listed_everywhere() -> bool:
        # An activation is reported as the pointer swaps; a model that was not
        # warm yet is listed once its worker has loaded.
        return all({m.id for m in openai.OpenAI(base_url=f"{a.api_url()}/v1",
                                                api_key="unused").models.list().data}
                   == {CHAT, EMBED} for a in world.agents)

    wait_until(listed_everywhere, 120, "both models listed by every agent", poll=1.0)

    embeddings = EmbeddingLoad(world.agents).start()
    chats = LoadDriver(lambda: world.agents, CHAT, max_requests=400, max_seconds=600,
                       max_tokens=8).start()
    try:
        r = world.api.post("/v1/rollouts", json={
            "model": CHAT, "version": "1.1.0", "target": {"labels": LABEL},
            "stages": [{"percent": 34, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
            "gates": {"min_devices_reporting": 1, "max_failed": 0},
            "on_failure": "rollback", "max_concurrent_downloads": 1,
        })
        assert r.status_code == 201, r.text
        rollout_id = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            detail = world.api.get(f"/v1/rollouts/{rollout_id}").json()
            return detail if detail["state"] in ("completed", "rolled_back", "paused") else None

        detail = wait_until(finished, 480, "the chat model's rollout to finish", poll=1.0)
        assert detail["state"] == "completed", [(t["kind"], t["reason"])
                                                for t in detail["timeline"]]
        wait_until(lambda: _serving(world, {CHAT: "1.1.0", EMBED: "1.0.0"}), 120,
                   "1.1.0 and the embedder serving everywhere", poll=1.0)
    finally:
        embeddings.stop()
        chats.stop()

    assert embeddings.errors == [], embeddings.errors[:5]
    assert embeddings.served >= 3 * len(devices), embeddings.served
    assert chats.errors == [], chats.errors[:5]
    for device_id in devices:
        models = _models(world, device_id)
        assert models[CHAT]["version"] == "1.1.0" and models[EMBED]["version"] == "1.0.0"
        # The rollout touched the chat model's entry only.
        assert models[EMBED]["assignment"]["assignment_id"] == embed_before[device_id]
        assert models[EMBED]["assignment"]["ref"] == f"{EMBED}@1.0.0"
