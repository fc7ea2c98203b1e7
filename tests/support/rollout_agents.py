"""A fleet of real agent processes for rollout tests, and bounded inference load on it.

Each agent is ``slmfleet agent run`` with its own broker credentials, state
directory and local API on a free port, pretending to be a board through a
SIMULATED hardware preset (they all share this machine and the one
SmolLM2-135M GGUF). :class:`LoadDriver` sends chat requests to chosen
agents' local APIs, one at a time, so the agents have inference figures to
report in their heartbeats; it is bounded in requests and in time.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.agents import AgentProcess, write_agent_config

_API_LINE = re.compile(r"local API on (http://127\.0\.0\.1:\d+)")


@dataclass
class FleetAgent:
    """One running agent and what a test needs to reach it."""

    device_id: str
    preset: str
    process: AgentProcess
    _api: str | None = None

    def api_url(self) -> str | None:
        """The local API's base URL once the agent logged it (it listens on port 0)."""
        if self._api is None:
            match = _API_LINE.search(self.process.log())
            self._api = match.group(1) if match else None
        return self._api


def start_agents(root: Path, broker_url: str, credentials: Callable[[str], str],
                 devices: Iterable[tuple[str, str]], **config: object) -> list[FleetAgent]:
    """Start one agent per (device id, preset), all at once; return without waiting."""
    agents = []
    for device_id, preset in devices:
        path = write_agent_config(root / device_id, device_id, broker_url,
                                  credentials(device_id), simulate={"preset": preset}, **config)
        agents.append(FleetAgent(device_id, preset, AgentProcess(path)))
    return agents


@dataclass
class LoadDriver:
    """Chat requests, one at a time, round-robin over ``targets()`` agents' local APIs.

    ``targets`` is asked again before every request, so a test can widen or
    narrow the load while it runs. Stops after ``max_requests`` or
    ``max_seconds``, whichever comes first, or on :meth:`stop`.
    """

    targets: Callable[[], list[FleetAgent]]
    model: str
    max_requests: int = 200
    max_seconds: float = 120.0
    max_tokens: int = 24
    served: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> LoadDriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        with httpx.Client(timeout=60) as client:
            while sent < self.max_requests and time.monotonic() < deadline:
                agents = [a for a in self.targets() if a.api_url()]
                if not agents:
                    if self._stop.wait(0.2):
                        return
                    continue
                for agent in agents:
                    if self._stop.is_set() or sent >= self.max_requests:
                        return
                    sent += 1
                    try:
                        prompt = f"Write a short poem about the sea ({sent})."
                        r = client.post(f"{agent.api_url()}/v1/chat/completions", json={
                            "model": self.model,
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": self.max_tokens, "temperature": 0})
                    except httpx.HTTPError as exc:
                        self.errors.append(f"{agent.device_id}: {exc!r}")
                        continue
                    if r.status_code == 200:
                        self.served[agent.device_id] = self.served.get(agent.device_id, 0) + 1
                    else:
                        self.errors.append(f"{agent.device_id}: {r.status_code} {r.text[:200]}")
                        # A refused request returns at once: pace them so a
                        # worker being swapped does not use up the budget.
                        if self._stop.wait(0.5):
                            return


def f32_copy(source: Path, target: Path) -> Path:
    """The same model with its weights stored as F32 instead of Q4_1.

    Same answers, but each decoded token reads ~5.6x more weight bytes, so on
    this machine it decodes at about half the tokens/s of the Q4_1 file: a
    release that is healthy and slower for real.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # the source is quantized already
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                        ctypes.byref(params))
    if rc != 0 or not target.is_file():
        raise RuntimeError(f"llama_model_quantize {source} -> {target} failed ({rc})")
    return target
