"""``slmfleet dev``: a whole fleet on one machine.

Starts a real Mosquitto (passwords and ACLs on), the control plane on SQLite
and a few agents as separate processes. The agents run with a SIMULATED
hardware override (each presents a different recorded board) because they all
share this one machine; everything else (broker, protocol, database) is real.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w

from .config import ControlPlaneSettings
from .mosquitto import CONTROL_PLANE_USER, MosquittoBroker
from .service import ControlPlane

#: (device id, simulated board preset, labels) of the demo fleet
DEMO_DEVICES: list[tuple[str, str, dict[str, str]]] = [
    ("pi4-kitchen", "raspberry-pi-4-4gb", {"site": "home", "room": "kitchen"}),
    ("jetson-lab", "jetson-orin-nano-8gb", {"site": "lab"}),
    ("ws-render", "x86_64-gpu-workstation", {"site": "lab"}),
]


@dataclass
class DevFleet:
    """Everything ``slmfleet dev`` started, so it can all be stopped."""

    data_dir: Path
    api_port: int = 0
    heartbeat_s: float = 5.0
    log: Callable[[str], None] = print
    broker: MosquittoBroker | None = None
    controlplane: ControlPlane | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        """Start broker, control plane and agents; wait until all agents reported."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        users = {CONTROL_PLANE_USER: secrets.token_urlsafe(18)}
        users |= {dev: secrets.token_urlsafe(18) for dev, _, _ in DEMO_DEVICES}
        self.log("starting Mosquitto (passwords and ACLs on)")
        self.broker = MosquittoBroker(self.data_dir / "broker", users=users).start()
        self.log(f"broker {self.broker.url}")
        settings = ControlPlaneSettings(
            data_dir=self.data_dir / "controlplane",
            mqtt_url=self.broker.url,
            mqtt_username=CONTROL_PLANE_USER,
            mqtt_password=users[CONTROL_PLANE_USER],
            api_port=self.api_port,
            heartbeat_interval_s=self.heartbeat_s,
        )
        self.log("starting the control plane (SQLite)")
        self.controlplane = ControlPlane(settings)
        self.controlplane.start()
        for device_id, preset, labels in DEMO_DEVICES:
            self._start_agent(device_id, preset, labels, users[device_id])
        self.wait_for_devices([d for d, _, _ in DEMO_DEVICES])

    def _start_agent(self, device_id: str, preset: str, labels: dict[str, str], pw: str) -> None:
        assert self.broker is not None
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
        }
        path = agent_dir / "agent.toml"
        path.write_text(tomli_w.dumps(config))
        path.chmod(0o600)
        log_file = open(agent_dir / "agent.log", "ab")  # noqa: SIM115 - owned by the child
        self.agents[device_id] = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli.main", "agent", "run", "--config", str(path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self.log(f"agent {device_id} started (simulated {preset})")

    @property
    def api_url(self) -> str:
        assert self.controlplane is not None
        return self.controlplane.api_url

    def wait_for_devices(self, device_ids: list[str], timeout: float = 30.0) -> list[dict]:
        """Poll the API until every device in ``device_ids`` is online."""
        deadline = time.monotonic() + timeout
        while True:
            items = httpx.get(f"{self.api_url}/v1/devices", params={"limit": 500}).json()["items"]
            online = {d["id"] for d in items if d["online"]}
            if set(device_ids) <= online:
                return items
            for device_id, proc in self.agents.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"agent {device_id} exited with {proc.returncode}; see "
                        f"{self.data_dir / 'agents' / device_id / 'agent.log'}"
                    )
            if time.monotonic() > deadline:
                missing = sorted(set(device_ids) - online)
                raise RuntimeError(f"devices never came online: {', '.join(missing)}")
            time.sleep(0.2)

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
        if self.controlplane is not None:
            self.controlplane.stop()
            self.controlplane = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
