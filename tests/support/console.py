"""A control plane with a console to open in the browser: signed releases, two
simulated devices, tokens of every role.

Use with ``pytest_plugins = ["tests.support.trust_fixtures", "tests.support.browser",
"tests.support.console"]``: each module gets its own control plane.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import protocol as p
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.console_data import Tokens, issue_tokens, rollout_spec
from tests.support.controlplane import cp_settings, wait_until
from tests.support.registry import TrustFiles, publish
from tests.support.rollout_fleet import Behaviour, SimFleet
from tests.support.signer import TrustSimulator


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, cp_credentials: Any,
       trust: TrustFiles, sim: TrustSimulator) -> Iterator[ControlPlane]:
    settings = cp_settings(tmp_path_factory.mktemp("cp"), broker, cp_credentials,
                           **trust.settings())
    plane = ControlPlane(settings, rollout_tick_s=0.5).start()
    with httpx.Client(base_url=plane.api_url, headers=ADMIN_HEADERS) as api:
        publish(api, sim, "smollm2", "1.0.0", (p.Tier.MICRO,))
        publish(api, sim, "smollm2", "1.1.0", (p.Tier.MICRO,))
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def api(cp: ControlPlane) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def tokens(api: httpx.Client) -> Tokens:
    return issue_tokens(api, "console")


@pytest.fixture(scope="module")
def fleet(cp: ControlPlane, broker: MosquittoBroker, sim: TrustSimulator,
          api: httpx.Client) -> Iterator[SimFleet]:
    """Two simulated micro devices on 1.0.0, heartbeating (so their charts have data)."""
    f = SimFleet(broker, sim, heartbeat_s=0.5)
    for n in (1, 2):
        f.add(f"ui-sim-{n}", "micro", {"1.1.0": Behaviour()}, labels={"ui": "console"},
              active=("smollm2", "1.0.0"))
    wait_until(lambda: len(api.get("/v1/devices", params={"label": "ui=console",
                                                          "online": True}).json()["items"]) == 2,
               10, "the simulated devices online")
    yield f
    f.close()


@pytest.fixture
def rollout(api: httpx.Client, fleet: SimFleet) -> str:
    """A rollout of 1.1.0 waiting for approval: it stays put while a test acts on it."""
    made = api.post("/v1/rollouts", json=rollout_spec("1.1.0", {"ui": "console"}))
    assert made.status_code == 201, made.text
    rollout_id = made.json()["id"]
    wait_until(lambda: api.get(f"/v1/rollouts/{rollout_id}").json()["state"]
               == "awaiting_approval", 10, "the rollout waiting for approval")
    return rollout_id


@pytest.fixture(scope="module")
def console_url(cp: ControlPlane) -> str:
    return cp.api_url
