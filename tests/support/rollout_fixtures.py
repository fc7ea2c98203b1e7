"""Fixtures of the rollout test modules: an API client for the module's control plane
(its ``cp`` fixture) and a fleet of honest simulated devices on the shared broker."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.rollout_fleet import SimFleet
from tests.support.signer import TrustSimulator


@pytest.fixture
def api(cp: ControlPlane) -> Iterator[httpx.Client]:
    """An admin client of the module's control plane."""
    with httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=10) as client:
        yield client


@pytest.fixture
def fleet(broker: MosquittoBroker, sim: TrustSimulator) -> Iterator[SimFleet]:
    """Simulated devices for one test, torn down (retained messages cleared) after it."""
    f = SimFleet(broker, sim)
    yield f
    f.close()
