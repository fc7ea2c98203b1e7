"""``slmfleet dev``: a whole fleet on one machine.

Starts a real Mosquitto (passwords and ACLs on, its files managed by the
control plane, which enrolls each device through its API), the control plane
on SQLite and a few agents as separate processes. The agents run with a SIMULATED
hardware override (each presents a different recorded board) because they all
share this one machine; everything else (broker, protocol, database) is real.

Then it shows what the fleet is for (:meth:`DevFleet.demo`): a chat release
with a variant per tier rolled out canary-first to every device; an
embedding model assigned beside it; the chat model's next version rolled
out canary-first while the embedder keeps serving; and a release that fails
its health check stopped at the canary and rolled back by the rollout
engine, with every decision and its reason printed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import yaml

from ..auth.bootstrap import rotate_named_token
from ..auth.roles import Role
from ..broker_auth import CONTROL_PLANE_USER
from ..config import ControlPlaneSettings
from ..db import session_factory
from ..db.statuses import FINISHED_ROLLOUT_STATES
from ..keyfiles import build_key_list, generate_key, read_private_key, write_atomic
from ..service import ControlPlane
from .demo_specs import (
    BAD_HEALTH_CHECK,
    BAD_VERSION,
    CHAT_MODEL,
    DEMO_DEVICES,
    DEMO_TICK_S,
    EMBED_MODEL,
    EMBED_VERSION,
    GOOD_VERSION,
    LOW_QUALITY_VERSION,
    NEXT_VERSION,
    demo_release_spec,
    demo_rollout_spec,
)
from .low_quality import publish_low_quality
from .model_cache import onnx_genai_path, smollm2_path
from .mosquitto import MosquittoBroker

#: the demo's admin token lives a day; each run revokes the previous one
DEV_TOKEN_TTL_S = 86_400.0

_ROLLOUT_FINAL = FINISHED_ROLLOUT_STATES

#: how long an agent may take from online to its local API answering (the
#: probe and the worker's start are behind it; a model it serves loads first)
AGENT_API_TIMEOUT_S = 60.0


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now.

    The sockets are held until all are picked, so the kernel cannot hand the
    same port out twice. Another process may still take one before the agent
    binds it; that agent then exits saying so (``wait_for_devices`` reports it).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@dataclass(frozen=True)
class DevKeys:
    """The demo's trust material: one release key, one director key, both pinned lists."""

    release_key: Path
    director_key: Path
    release_keys_file: Path
    director_keys_file: Path


def ensure_dev_keys(directory: Path) -> DevKeys:
    """Create 1-of-1 release and director keys and their pinned lists on first run.

    Later runs reuse them, so agents that already pinned the lists keep
    trusting the control plane. Real fleets keep release keys offline
    (docs/models.md); here the release key sits beside the data for the demo.
    """
    paths = {}
    for role in ("release", "director"):
        pinned = directory / f"{role}-keys.json"
        existing = sorted((directory / role).glob("*.key"))
        if existing and pinned.is_file():
            paths[role] = (existing[0], pinned)
            continue
        key, key_path, _ = generate_key(directory / role, role)
        write_atomic(
            pinned,
            build_key_list(role, [key.public], [read_private_key(key_path)], threshold=1,
                           now=time.time()),
        )
        paths[role] = (key_path, pinned)
    return DevKeys(
        release_key=paths["release"][0],
        director_key=paths["director"][0],
        release_keys_file=paths["release"][1],
        director_keys_file=paths["director"][1],
    )


def dev_settings(
    data_dir: Path,
    broker: MosquittoBroker,
    cp_password: str,
    keys: DevKeys,
    *,
    api_port: int = 0,
    heartbeat_s: float = 5.0,
) -> ControlPlaneSettings:
    """The demo control plane's settings: SQLite under ``data_dir``, ``broker`` with
    its password file, ACL and pid file (so devices are enrolled through the API,
    as in production), and the demo's keys."""
    return ControlPlaneSettings(
        data_dir=data_dir,
        mqtt_url=broker.url,
        mqtt_username=CONTROL_PLANE_USER,
        mqtt_password=cp_password,
        api_port=api_port,
        heartbeat_interval_s=heartbeat_s,
        release_keys_file=keys.release_keys_file,
        director_keys_file=keys.director_keys_file,
        director_key_files=[keys.director_key],
        mosquitto_passwd_file=broker.passwd_file,
        mosquitto_acl_file=broker.acl_file,
        mosquitto_pid_file=broker.pid_file,
        dev_mode=True,
        # The demo prints a token of its own each run (DevFleet.token); a
        # first-start token nobody is shown keeps the output to that one line.
        bootstrap_token=secrets.token_urlsafe(32),
    )


@dataclass
class DevFleet:
    """Everything ``slmfleet dev`` started, so it can all be stopped."""

    data_dir: Path
    api_port: int = 0
    heartbeat_s: float = 5.0
    log: Callable[[str], None] = print
    broker: MosquittoBroker | None = None
    controlplane: ControlPlane | None = None
    keys: DevKeys | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: an admin API token issued for this run (the `TOKEN` line)
    token: str | None = None
    #: a one-time code that signs a browser in to the console as that token
    #: (the `CONSOLE` line): a token never goes into a URL
    console_code: str | None = None
    #: each agent's local OpenAI-compatible API, ``http://127.0.0.1:PORT/v1``
    #: (the `AGENT` lines); every agent has a port of its own
    agent_urls: dict[str, str] = field(default_factory=dict)
    #: the low-quality release was published (it needs a model llama.cpp can quantize)
    low_quality: bool = False

    def start(self) -> None:
        """Start broker, control plane and agents; wait until all agents reported
        and each one's local API answers."""
        self.start_services()
        ports = free_loopback_ports(len(DEMO_DEVICES))
        for (device_id, preset, labels), port in zip(DEMO_DEVICES, ports, strict=True):
            self._start_agent(device_id, preset, labels, self.enroll(device_id), port)
        self.wait_for_devices([d for d, _, _ in DEMO_DEVICES])
        self.wait_for_agent_apis()

    def start_services(self) -> None:
        """Start the broker and the control plane, and issue this run's admin token."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys = keys = ensure_dev_keys(self.data_dir / "keys")
        self.log(f"release key {keys.release_key} (for `slmfleet models publish --key`)")
        cp_password = secrets.token_urlsafe(18)
        self.log("starting Mosquitto (passwords and ACLs on)")
        self.broker = MosquittoBroker(
            self.data_dir / "broker", users={CONTROL_PLANE_USER: cp_password}
        ).start()
        self.log(f"broker {self.broker.url}")
        settings = dev_settings(
            self.data_dir / "controlplane", self.broker, cp_password, keys,
            api_port=self.api_port, heartbeat_s=self.heartbeat_s,
        )
        self.log("starting the control plane (SQLite)")
        self.controlplane = ControlPlane(settings, rollout_tick_s=DEMO_TICK_S)
        self.controlplane.start()
        assert self.controlplane.engine is not None
        self.token = rotate_named_token(
            session_factory(self.controlplane.engine), "slmfleet dev", Role.ADMIN, DEV_TOKEN_TTL_S
        )
        made = httpx.post(f"{self.api_url}/ui/sign-in-codes", headers=self.headers,
                          json={"ttl_s": DEV_TOKEN_TTL_S})
        if made.status_code != 201:
            raise RuntimeError(f"no console sign-in code: HTTP {made.status_code}: {made.text}")
        self.console_code = str(made.json()["code"])

    @property
    def console_url(self) -> str:
        """The console's address (sign in there with :attr:`console_code`)."""
        return f"{self.api_url}/ui/"

    def enroll(self, device_id: str) -> str:
        """Enroll ``device_id`` through the API, as an operator would; its MQTT password."""
        response = httpx.post(
            f"{self.api_url}/v1/devices/{device_id}/credentials", headers=self.headers
        )
        if response.status_code != 201:
            raise RuntimeError(
                f"enrolling {device_id} failed: HTTP {response.status_code}: {response.text}"
            )
        return str(response.json()["password"])

    def _start_agent(self, device_id: str, preset: str, labels: dict[str, str], pw: str,
                     api_port: int) -> None:
        assert self.broker is not None and self.keys is not None
        agent_dir = self.data_dir / "agents" / device_id
        agent_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "device_id": device_id,
            "broker_url": self.broker.url,
            "password": pw,
            "state_dir": str(agent_dir / "state"),
            "heartbeat_interval_s": self.heartbeat_s,
            "labels": labels,
            # SIMULATED hardware: all demo agents share this machine.
            "simulate": {"preset": preset},
            # What a real install pins at provisioning time (docs/models.md).
            "release_keys_file": str(self.keys.release_keys_file),
            "director_keys_file": str(self.keys.director_keys_file),
            # Its own local API port: the agents share this machine's loopback.
            "api_port": api_port,
        }
        path = agent_dir / "agent.toml"
        path.write_text(tomli_w.dumps(config))
        path.chmod(0o600)
        log_file = open(agent_dir / "agent.log", "ab")  # noqa: SIM115 - owned by the child
        self.agents[device_id] = subprocess.Popen(
            [sys.executable, "-m", "slmfleet", "agent", "run", "--config", str(path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self.agent_urls[device_id] = f"http://127.0.0.1:{api_port}/v1"
        self.log(f"agent {device_id} started (simulated {preset})")

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header carrying this run's admin token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def api_url(self) -> str:
        assert self.controlplane is not None
        return self.controlplane.api_url

    def wait_for_devices(self, device_ids: list[str], timeout: float = 30.0) -> list[dict]:
        """Poll the API until every device in ``device_ids`` is online."""
        deadline = time.monotonic() + timeout
        while True:
            items = httpx.get(
                f"{self.api_url}/v1/devices", params={"limit": 500}, headers=self.headers
            ).json()["items"]
            online = {d["id"] for d in items if d["online"]}
            if set(device_ids) <= online:
                return items
            self._check_agents_running()
            if time.monotonic() > deadline:
                missing = sorted(set(device_ids) - online)
                raise RuntimeError(f"devices never came online: {', '.join(missing)}")
            time.sleep(0.2)

    def _check_agents_running(self) -> None:
        """Raise, pointing at its log, if an agent has exited (its log says why)."""
        for device_id, proc in self.agents.items():
            if proc.poll() is not None:
                log = self.data_dir / "agents" / device_id / "agent.log"
                lines = log.read_text(errors="replace").strip().splitlines() or [""]
                raise RuntimeError(
                    f"agent {device_id} exited with {proc.returncode}: {lines[-1]} (see {log})"
                )

    def wait_for_agent_apis(self, timeout: float = AGENT_API_TIMEOUT_S) -> None:
        """Poll until every agent's local API answers ``GET /v1/models``."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.agent_urls)
        while waiting:
            for device_id, url in list(waiting.items()):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                        del waiting[device_id]
            self._check_agents_running()
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"local APIs never answered: {', '.join(sorted(waiting))}")
            if waiting:
                time.sleep(0.2)

    def _publish(self, version: str, model: Path, name: str = CHAT_MODEL, **kwargs: Any) -> None:
        from ..client import publish_release

        assert self.keys is not None
        if httpx.get(f"{self.api_url}/v1/models/{name}/versions/{version}",
                     headers=self.headers).status_code == 200:
            self.log(f"{name}@{version} is already published (from an earlier run)")
            return
        spec = self.data_dir / f"{name}-{version}.release.yaml"
        spec.write_text(yaml.safe_dump(demo_release_spec(model, version, name=name, **kwargs),
                                       sort_keys=False))
        self.log(f"publishing {name}@{version} (signed with the demo release key)")
        publish_release(spec, [self.keys.release_key], self.api_url, self.token)

    def publish_releases(self, model: Path | None = None) -> None:
        """Publish the demo's releases: the chat model's good, next, bad (it
        fails its health check) and low-quality (it scores lower on the
        evaluation set) versions, and the embedder.

        Without ``model`` the set-up's builds are used, and the next version
        gives the NPU laptop's tier the onnxruntime-genai build of the same
        model (an ONNX variant beside GGUF ones in one release).
        """
        onnx = None
        if model is None:
            model = smollm2_path()
            onnx = onnx_genai_path()
            if onnx is None:
                self.log("no ONNX build of SmolLM2 (scripts/build-onnx-genai.sh builds it): "
                         f"{CHAT_MODEL}@{NEXT_VERSION} ships GGUF for every tier")
        if not model.is_file():
            raise RuntimeError(f"demo model {model} is missing; run scripts/bootstrap.sh")
        self._publish(GOOD_VERSION, model)
        self._publish(NEXT_VERSION, model, onnx_folder=onnx,
                      description="SmolLM2-135M-Instruct, the chat model's next version: "
                                  "Q4_1 GGUF, and int4 ONNX for the small tier when built")
        self._publish(BAD_VERSION, model, health_check=BAD_HEALTH_CHECK,
                      description="SmolLM2-135M with a golden prompt it answers wrongly: "
                                  "a release that fails its health check on the devices")
        self.low_quality = publish_low_quality(self._publish, model, self.log)
        self._publish(EMBED_VERSION, model, name=EMBED_MODEL, embeddings=True,
                      description="SmolLM2-135M with embeddings on: the demo's embedder")

    def assign_everywhere(self, name: str, version: str) -> dict[str, Any]:
        """Assign ``name@version`` beside what every demo device runs; log each outcome.

        A device whose agent reads one model (it says ``slmfleet.hello/1``)
        is refused with ``needs_upgrade`` and keeps what it runs.
        """
        body = {"model": name, "version": version,
                "selector": {"device_ids": [d for d, _, _ in DEMO_DEVICES]}}
        response = httpx.post(f"{self.api_url}/v1/devices/*/assignment", json=body,
                              headers=self.headers, timeout=30)
        response.raise_for_status()
        done = response.json()
        for result in done["results"]:
            note = result["status"] if result["status"] == "assigned" else (
                f"{result['status']}: {result.get('reason')}")
            self.log(f"{name}@{version} -> {result['device_id']}: {note}")
        return done

    def demo(
        self,
        model: Path | None = None,
        timeout: float = 300.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[dict]:
        """The mission: a chat model, an embedder beside it, rollouts of the chat
        model alone; return the rollouts' final details.

        A good release goes canary-first to every device, each getting its
        tier's variant; an embedding model is assigned beside it; a release
        that passes every health check but answers fewer of the evaluation
        set stops at the canary on the quality gate and is rolled back (it
        goes before the ONNX release so the canary compares two GGUF builds
        of one model); the chat model's next version goes out canary-first
        while the embedder keeps serving; last, a release whose health check
        fails on the devices stops at the canary and is rolled back
        automatically (the chat model only: the embedder's entry never
        changes).
        """
        self.publish_releases(model)
        done = []
        steps: list[tuple[str, str]] = [
            (GOOD_VERSION, "a good release"),
            ("", "the embedder"),
        ]
        if self.low_quality:
            steps.append((LOW_QUALITY_VERSION,
                          "a healthy release that answers fewer of the evaluation set"))
        steps += [
            (NEXT_VERSION, "the chat model's next version, the embedder serving beside it"),
            (BAD_VERSION, "a release whose health check fails"),
        ]
        for version, why in steps:
            if should_stop():
                break
            if not version:
                self.log(f"assigning {EMBED_MODEL}@{EMBED_VERSION} ({why}) beside the chat model")
                self.assign_everywhere(EMBED_MODEL, EMBED_VERSION)
                continue
            self.log(f"rolling out {CHAT_MODEL}@{version} ({why}): canary first, then 100 %")
            done.append(self.run_rollout(demo_rollout_spec(version), timeout, should_stop))
        return done

    def run_rollout(
        self, spec: dict[str, Any], timeout: float, should_stop: Callable[[], bool]
    ) -> dict:
        """Create a rollout and log its decisions and device outcomes until it is over."""
        response = httpx.post(f"{self.api_url}/v1/rollouts", json=spec, headers=self.headers)
        if response.status_code != 201:
            raise RuntimeError(f"rollout refused: HTTP {response.status_code}: {response.text}")
        rollout_id = response.json()["id"]
        deadline = time.monotonic() + timeout
        shown = 0
        states: dict[str, str] = {}
        while True:
            detail = httpx.get(f"{self.api_url}/v1/rollouts/{rollout_id}",
                               headers=self.headers).json()
            for member in detail["devices"]:
                state = member["state"]
                if states.get(member["device_id"]) != state:
                    states[member["device_id"]] = state
                    extra = member["reason"] or (
                        f"variant {member['variant_tier']}" if member["variant_tier"] else "")
                    self.log(f"  {member['device_id']} ({member['device_tier']}): {state}"
                             + (f" — {extra}" if extra else ""))
            for decision in detail["timeline"][shown:]:
                self.log(f"[{rollout_id} {decision['kind']}] {decision['reason']}")
            shown = len(detail["timeline"])
            if detail["state"] in _ROLLOUT_FINAL or should_stop():
                return detail
            if time.monotonic() > deadline:
                raise RuntimeError(f"rollout {rollout_id} still {detail['state']} after "
                                   f"{timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop agents (SIGTERM, so they publish offline), then control plane and broker."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.agents.clear()
        self.agent_urls.clear()
        if self.controlplane is not None:
            self.controlplane.stop()
            self.controlplane = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
