"""A set of models end to end: three real agents run a chat model and an embedder at once.

The module's fleet (:mod:`tests.support.fleet_e2e`: real Mosquitto
with ACLs on, a control plane on SQLite, three ``slmfleet agent run``
processes with simulated hardware presets) and the real SmolLM2-135M GGUF
(the embedder is the same file with embeddings on). Each device is
assigned ``smollm2-135m@1.0.0`` and ``smollm2-embed@1.0.0``; both serve
through the local API at once; a canary-first rollout of
``smollm2-135m@1.1.0`` then completes while the official ``openai`` client
keeps asking every device for embeddings (and chat answers), and not one of
those requests fails. The embedder's entry never changes: same release, same
assignment id. Taken off the devices at the end, the embedder's worker
process exits at once and the chat model goes on serving.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from controlplane.devfleet.demo_specs import demo_release_spec
from tests.support.controlplane import wait_until
from tests.support.fleet_e2e import FLEET_LABEL, Fleet
from tests.support.inference import worker_pids
from tests.support.rollout_agents import FleetAgent, LoadDriver
from tests.support.rollout_runs import run_rollout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
pytest_plugins = ["tests.support.fleet_e2e"]

CHAT, EMBED = "smollm2-135m", "smollm2-embed"


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
    three_agents: Fleet, model_path: Path,
) -> None:
    fleet = three_agents
    devices = fleet.device_ids
    for name, version, extra in ((CHAT, "1.0.0", {}), (CHAT, "1.1.0", {}),
                                 (EMBED, "1.0.0", {"embeddings": True})):
        fleet.publish(demo_release_spec(model_path, version, name=name, **extra))
    for name in (CHAT, EMBED):
        fleet.assign(name, "1.0.0")
    wait_until(lambda: fleet.serving({CHAT: "1.0.0", EMBED: "1.0.0"}), 300,
               "both models serving on every device", poll=1.0)
    embed_before = {d: fleet.models(d)[EMBED]["assignment"]["assignment_id"] for d in devices}

    def listed_everywhere() -> bool:
        # An activation is reported as the pointer swaps; a model that was not
        # warm yet is listed once its worker has loaded.
        return all({m.id for m in openai.OpenAI(base_url=f"{a.api_url()}/v1",
                                                api_key="unused").models.list().data}
                   == {CHAT, EMBED} for a in fleet.agents)

    wait_until(listed_everywhere, 120, "both models listed by every agent", poll=1.0)

    embeddings = EmbeddingLoad(fleet.agents).start()
    chats = LoadDriver(lambda: fleet.agents, CHAT, max_requests=400, max_seconds=600,
                       max_tokens=8).start()
    try:
        detail = run_rollout(fleet.api, {
            "model": CHAT, "version": "1.1.0", "target": {"labels": FLEET_LABEL},
            "stages": [{"percent": 34, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
            "gates": {"min_devices_reporting": 1, "max_failed": 0},
            "on_failure": "rollback", "max_concurrent_downloads": 1,
        }, 480)
        assert detail["state"] == "completed", [(t["kind"], t["reason"])
                                                for t in detail["timeline"]]
        wait_until(lambda: fleet.serving({CHAT: "1.1.0", EMBED: "1.0.0"}), 120,
                   "1.1.0 and the embedder serving everywhere", poll=1.0)
    finally:
        embeddings.stop()
        chats.stop()

    assert embeddings.errors == [], embeddings.errors[:5]
    assert embeddings.served >= 3 * len(devices), embeddings.served
    assert chats.errors == [], chats.errors[:5]
    for device_id in devices:
        models = fleet.models(device_id)
        assert models[CHAT]["version"] == "1.1.0" and models[EMBED]["version"] == "1.0.0"
        # The rollout touched the chat model's entry only.
        assert models[EMBED]["assignment"]["assignment_id"] == embed_before[device_id]
        assert models[EMBED]["assignment"]["ref"] == f"{EMBED}@1.0.0"

    # The embedder leaves the sets: its worker process ends now, not at a restart.
    def workers(count: int) -> bool:
        return all(len(worker_pids(a.process.proc.pid)) == count for a in fleet.agents)

    # One worker each for the chat model and the embedder once 1.0.0's has retired.
    wait_until(lambda: workers(2), 60, "two workers on every agent", poll=0.5)
    fleet.unassign(EMBED)
    wait_until(lambda: all(EMBED not in fleet.models(d) for d in devices), 120,
               "the embedder off every device", poll=1.0)
    wait_until(lambda: workers(1), 60, "each embedder's worker to exit", poll=0.5)
    for agent in fleet.agents:
        client = openai.OpenAI(base_url=f"{agent.api_url()}/v1", api_key="unused",
                               max_retries=0)
        assert {m.id for m in client.models.list().data} == {CHAT}
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model=EMBED, input=["kiosk"])
