"""Shared fixtures: one real Mosquitto broker (passwords and ACLs on) and the
real SmolLM2-135M model for the whole session."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.model_cache import smollm2_path
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support import database
from tests.support.mqtt import provision_device
from tests.support.postgres import PostgresCluster, server_bin


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
    path = smollm2_path()
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run scripts/bootstrap.sh", pytrace=False)
    return path


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL server for the session (scripts/bootstrap.sh installs it)."""
    if server_bin() is None:
        pytest.fail("PostgreSQL server binaries not found: run scripts/bootstrap.sh "
                    "(Debian package postgresql)", pytrace=False)
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database for one test; its SQLAlchemy URL."""
    return postgres_cluster.create_database(f"t_{secrets.token_hex(4)}")


#: modules whose tests run on both databases (the control plane's own tests)
BOTH_DATABASES = frozenset({
    "tests.test_controlplane_api", "tests.test_controlplane_ingest", "tests.test_registry_api",
    "tests.test_auth", "tests.test_director", "tests.test_rollouts", "tests.test_model_sets_cp",
})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: checks something only SQLite has (its file lock, its files); "
        "not run on PostgreSQL",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test of the control-plane modules on SQLite and on PostgreSQL."""
    if metafunc.module.__name__ not in BOTH_DATABASES:
        return
    if "database_backend" not in metafunc.fixturenames:
        metafunc.fixturenames.append("database_backend")
    backends = ["sqlite"]
    if metafunc.definition.get_closest_marker("sqlite_only") is None:
        backends.append("postgresql")
    metafunc.parametrize("database_backend", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def database_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The database the module's control planes use: each gets a fresh one on PostgreSQL."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        database.use(lambda: cluster.create_database(f"t_{secrets.token_hex(4)}"))
    try:
        yield backend
    finally:
        database.use(None)
