"""Schemathesis against the control plane's own OpenAPI, every check it has.

A real control plane like ``slmfleet dev``'s (real Mosquitto, SQLite,
release and director keys, broker files for enrollment, so no route is
switched off) holding one enrolled device that said hello. Two tests:

- every operation gets a bounded number of generated requests, valid and
  invalid (schemathesis's coverage and fuzzing phases);
- the stateful phase follows the API's OpenAPI links (a token created, then
  revoked; a device listed, then read; an artifact uploaded, then fetched).

Every built-in check runs on every response: no 5xx, status codes, content
types, headers and bodies as documented, invalid data refused, valid data
accepted, ``Allow`` on a 405, authentication not ignored, and the stateful
ones (use after free, resource availability). :data:`NOT_IN_THE_SCHEMA`
lists each check left out for one operation, and why.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.specs.openapi.checks import positive_data_acceptance

import protocol as p
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings, hello, wait_until
from tests.support.mqtt import RawClient
from tests.support.registry import registry_api, write_trust
from tests.support.signer import TrustSimulator

pytestmark = pytest.mark.integration

#: generated requests per operation: enough to reach every parameter's edges,
#: few enough that the module runs in about a minute on a small machine
MAX_EXAMPLES = 8
#: stateful scenarios, and calls in each: enough to walk every link once or twice
STATEFUL_SCENARIOS = 15
STATEFUL_STEPS = 6
#: the device the live control plane knows, so the device routes find one
DEVICE_ID = "st-device-1"

load_all_checks()
#: every check schemathesis has (what `st run --checks all` runs)
ALL_CHECKS = CHECKS.get_all()

#: checks that cannot hold for one operation, because a rule the route enforces
#: is one OpenAPI cannot state: the request is schema-valid and still wrong
NOT_IN_THE_SCHEMA: dict[tuple[str, str], tuple[Any, str]] = {
    ("POST", "/v1/models"): (
        positive_data_acceptance,
        "a release must carry signatures from the pinned release keys over its manifest",
    ),
    ("POST", "/v1/rollouts"): (
        positive_data_acceptance,
        "a rollout's target needs at least one non-empty criterion, its stages rising "
        "percentages: rules across fields",
    ),
    ("POST", "/v1/devices/{device_id}/assignment"): (
        positive_data_acceptance,
        "a selector in the body goes with the path id `*` only: a rule across path and body",
    ),
    ("PUT", "/v1/update-policies/profile/{name}"): (
        positive_data_acceptance,
        "a window's cron expression must parse and its time zone must exist",
    ),
    ("PUT", "/v1/update-policies/label/{key}/{value}"): (
        positive_data_acceptance,
        "a window's cron expression must parse and its time zone must exist",
    ),
    ("PUT", "/v1/artifacts/{path}"): (
        positive_data_acceptance,
        "the body must hash to X-Content-SHA256: a rule across header and body",
    ),
    ("PUT", "/v1/blobs/sha256/{sha256}"): (
        positive_data_acceptance,
        "the body must hash to the digest in the path: a rule across path and body",
    ),
}


def excluded_checks(case: schemathesis.Case) -> list[Any]:
    """The checks :data:`NOT_IN_THE_SCHEMA` leaves out for ``case``, and one more: a
    generated ``cursor`` is any string, but only a ``next`` the API issued is a
    cursor (they are opaque), so a generated one shows only that a bad one is refused."""
    out = []
    if (case.method, case.path) in NOT_IN_THE_SCHEMA:
        out.append(NOT_IN_THE_SCHEMA[case.method, case.path][0])
    if case.query and "cursor" in case.query:
        out.append(positive_data_acceptance)
    return out


def _openapi() -> dict[str, Any]:
    """The schema the app serves (it depends on the code and page_max, not on the data)."""
    with tempfile.TemporaryDirectory() as tmp:
        app, engine = registry_api(Path(tmp))
        try:
            return app.openapi()
        finally:
            engine.dispose()


schema = schemathesis.openapi.from_dict(_openapi())


@dataclass(frozen=True)
class LiveApi:
    """The control plane under test and the token the stateful run may revoke."""

    url: str
    admin_token_id: str
    spare_token_id: str


def _seed_device(api: str, broker_url: str) -> None:
    """Enroll :data:`DEVICE_ID` through the API and have it say hello with its password."""
    enrolled = httpx.post(f"{api}/v1/devices/{DEVICE_ID}/credentials", headers=ADMIN_HEADERS)
    assert enrolled.status_code == 201, enrolled.text
    device = RawClient(broker_url, DEVICE_ID, enrolled.json()["password"])
    try:
        assert device.connect() == 0
        device.publish(p.device_topic(DEVICE_ID, p.TopicKind.HELLO), p.encode(hello(DEVICE_ID)))
    finally:
        device.close()
    wait_until(
        lambda: httpx.get(f"{api}/v1/devices/{DEVICE_ID}", headers=ADMIN_HEADERS).is_success,
        what="the seeded device in the API",
    )


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    """A control plane with every part configured, device enrollment included (so on
    a broker of its own, whose password file it rewrites), one device enrolled."""
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
            api = plane.api_url
            _seed_device(api, broker.url)
            me = httpx.get(f"{api}/v1/auth/whoami", headers=ADMIN_HEADERS).json()
            spare = httpx.post(f"{api}/v1/tokens", headers=ADMIN_HEADERS,
                               json={"name": "revocable", "role": "viewer"})
            assert spare.status_code == 201, spare.text
            yield LiveApi(api, me["id"], spare.json()["id"])
        finally:
            plane.stop()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_keeps_its_schema(live_api: LiveApi, case: schemathesis.Case) -> None:
    case.call_and_validate(
        base_url=live_api.url, headers=ADMIN_HEADERS, checks=ALL_CHECKS,
        excluded_checks=excluded_checks(case), timeout=10,
    )


def test_linked_calls_keep_the_schema(live_api: LiveApi) -> None:
    """The stateful phase: sequences of calls along the schema's links."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: schemathesis.Case) -> None:
            # The links lead from the token list to revoking a listed token,
            # which may be the one this run authenticates with; it revokes
            # the spare one instead, so later calls still get through.
            if case.path_parameters and case.path_parameters.get("token_id") == (
                live_api.admin_token_id
            ):
                case.path_parameters["token_id"] = live_api.spare_token_id

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": live_api.url, "headers": ADMIN_HEADERS, "timeout": 10}

        def validate_response(
            self, response: Any, case: schemathesis.Case,
            additional_checks: Any = None, **kwargs: Any,
        ) -> None:
            case.validate_response(
                response, checks=ALL_CHECKS, excluded_checks=excluded_checks(case),
                transport_kwargs=kwargs or None, recorder=getattr(self, "recorder", None),
            )

    run_state_machine_as_test(
        Workflow,
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    # the run authenticated throughout: the admin token was never revoked
    assert httpx.get(f"{live_api.url}/v1/auth/whoami", headers=ADMIN_HEADERS).status_code == 200
