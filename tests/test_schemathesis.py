"""Schemathesis against the control plane's own OpenAPI, with an admin token.

A real control plane (real Mosquitto, SQLite, release and director keys,
broker files for enrollment, so no route is switched off) gets a bounded
number of generated requests per operation, valid and invalid. Checks: no
5xx, every status code and content type is one the schema documents, every
body matches its documented schema.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings
from tests.support.registry import registry_api, write_trust
from tests.support.signer import TrustSimulator

pytestmark = pytest.mark.integration

#: generated requests per operation: enough to reach every parameter's edges,
#: few enough that the module runs in well under a minute
MAX_EXAMPLES = 8

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def _openapi() -> dict[str, Any]:
    """The schema the app serves (it depends on the code, not on the data)."""
    with tempfile.TemporaryDirectory() as tmp:
        app, engine = registry_api(Path(tmp))
        try:
            return app.openapi()
        finally:
            engine.dispose()


schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a control plane with every part configured, device enrollment
    included (so on a broker of its own, whose password file it rewrites)."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    trust = write_trust(tmp / "keys", TrustSimulator())
    password = secrets.token_urlsafe(16)
    with MosquittoBroker(tmp / "broker", users={CONTROL_PLANE_USER: password}) as broker:
        settings = cp_settings(
            tmp / "cp", broker, (CONTROL_PLANE_USER, password), **trust.settings(),
            mosquitto_passwd_file=broker.passwd_file,
            mosquitto_acl_file=broker.acl_file,
            mosquitto_pid_file=broker.pid_file,
        )
        plane = ControlPlane(settings).start()
        try:
            yield plane.api_url
        finally:
            plane.stop()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_keeps_its_schema(live_api: str, case: schemathesis.Case) -> None:
    case.call_and_validate(base_url=live_api, headers=ADMIN_HEADERS, checks=CHECKS, timeout=10)
