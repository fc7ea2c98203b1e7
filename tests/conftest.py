"""Shared fixtures: one real Mosquitto broker (passwords and ACLs on) and the
real SmolLM2-135M model for the whole session."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.mosquitto import CONTROL_PLANE_USER, MosquittoBroker
from tests.support.mqtt import provision_device

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, shared by every test."""
    data = tmp_path_factory.mktemp("mosquitto")
    cp_password = secrets.token_urlsafe(16)
    with MosquittoBroker(data, users={CONTROL_PLANE_USER: cp_password}) as b:
        yield b


@pytest.fixture(scope="session")
def cp_credentials(broker: MosquittoBroker) -> tuple[str, str]:
    """(username, password) of the control plane's MQTT user."""
    return CONTROL_PLANE_USER, broker.users[CONTROL_PLANE_USER]


@pytest.fixture
def new_device(broker: MosquittoBroker):
    """Factory: provision a fresh device id on the broker, return its password."""

    def make(device_id: str) -> str:
        return provision_device(broker, device_id)

    return make


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real SmolLM2-135M GGUF, fetched by scripts/bootstrap.sh."""
    cache = Path(
        os.environ.get("SLMFLEET_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slmfleet"
    )
    path = cache / "models" / MODEL_NAME
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run scripts/bootstrap.sh", pytrace=False)
    return path
