"""Device enrollment against a real Mosquitto: the control plane writes the broker's
password file and ACL, and the broker holds each device to its own topics."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import protocol as p
from controlplane.auth.roles import Role
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support.auth import bearer, issue
from tests.support.mqtt import RawClient
from tests.support.registry import registry_api

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A broker of its own: the control plane rewrites this one's password file."""
    cp_password = secrets.token_urlsafe(16)
    with MosquittoBroker(
        tmp_path_factory.mktemp("acl-broker"), users={CONTROL_PLANE_USER: cp_password}
    ) as broker:
        yield broker


@pytest.fixture(scope="module")
def admin(
    own_broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app, engine = registry_api(
        tmp_path_factory.mktemp("acl-cp"),
        mqtt_url=own_broker.url,
        mqtt_password=own_broker.users[CONTROL_PLANE_USER],
        mosquitto_passwd_file=own_broker.passwd_file,
        mosquitto_acl_file=own_broker.acl_file,
        mosquitto_pid_file=own_broker.pid_file,
    )
    yield TestClient(app, headers=bearer(issue(app, Role.ADMIN)))
    engine.dispose()


def _connect(broker: MosquittoBroker, user: str, password: str) -> RawClient:
    client = RawClient(broker.url, user, password)
    client.connect()
    return client


def _accepted(broker: MosquittoBroker, user: str, password: str, timeout: float = 5.0) -> bool:
    """Whether the broker takes these credentials, allowing it a moment to reload."""
    deadline = time.monotonic() + timeout
    while True:
        client = _connect(broker, user, password)
        ok = client.connack is not None and not client.connack.is_failure
        client.close()
        if ok or time.monotonic() > deadline:
            return ok
        time.sleep(0.05)


def _refused(broker: MosquittoBroker, user: str, password: str, timeout: float = 5.0) -> bool:
    """Whether the broker refuses these credentials, allowing it a moment to reload."""
    deadline = time.monotonic() + timeout
    while True:
        client = _connect(broker, user, password)
        refused = client.connack is not None and client.connack.is_failure
        client.close()
        if refused or time.monotonic() > deadline:
            return refused
        time.sleep(0.05)


@pytest.fixture(scope="module")
def enrolled(admin: TestClient, own_broker: MosquittoBroker) -> dict[str, str]:
    passwords = {}
    for device_id in ("acl-a", "acl-b"):
        r = admin.post(f"/v1/devices/{device_id}/credentials")
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["username"] == device_id and body["broker_reloaded"] is True
        assert body["broker_url"] == own_broker.url
        passwords[device_id] = body["password"]
    for device_id, password in passwords.items():
        assert _accepted(own_broker, device_id, password), device_id
    return passwords


def test_a_device_publishes_only_under_its_own_id(
    own_broker: MosquittoBroker, enrolled: dict[str, str]
) -> None:
    a = _connect(own_broker, "acl-a", enrolled["acl-a"])
    try:
        own = a.publish(p.device_topic("acl-a", p.TopicKind.TELEMETRY), b"{}")
        assert not own.is_failure
        for kind in (p.TopicKind.TELEMETRY, p.TopicKind.HELLO, p.TopicKind.DESIRED):
            theirs = a.publish(p.device_topic("acl-b", kind), b"{}")
            assert theirs.is_failure, (kind, theirs)
        # nor may it write its own desired: only the control plane assigns
        assert a.publish(p.device_topic("acl-a", p.TopicKind.DESIRED), b"{}").is_failure
    finally:
        a.close()


def test_a_device_reads_only_its_own_desired(
    own_broker: MosquittoBroker, enrolled: dict[str, str]
) -> None:
    a = _connect(own_broker, "acl-a", enrolled["acl-a"])
    b = _connect(own_broker, "acl-b", enrolled["acl-b"])
    cp = _connect(own_broker, CONTROL_PLANE_USER, own_broker.users[CONTROL_PLANE_USER])
    try:
        a.subscribe(p.device_topic("acl-b", p.TopicKind.DESIRED))
        a.subscribe(p.device_topic("acl-b", p.TopicKind.TELEMETRY))
        b.subscribe(p.device_topic("acl-b", p.TopicKind.DESIRED))
        time.sleep(0.3)  # let both SUBSCRIBEs land before publishing
        for kind in (p.TopicKind.DESIRED, p.TopicKind.TELEMETRY):
            assert not cp.publish(p.device_topic("acl-b", kind), b"for-b").is_failure
        got = b.wait_messages(1)
        assert [m.payload for m in got] == [b"for-b"]
        time.sleep(0.5)
        assert a.messages == []
    finally:
        for client in (a, b, cp):
            client.close()


def test_a_wrong_password_is_refused(own_broker: MosquittoBroker, enrolled: dict[str, str]) -> None:
    assert _refused(own_broker, "acl-a", enrolled["acl-a"] + "x", timeout=0)
    assert _refused(own_broker, "acl-a", enrolled["acl-b"], timeout=0)
    assert _refused(own_broker, "never-enrolled", "anything", timeout=0)


def test_re_enrolling_rotates_and_revoking_refuses(
    admin: TestClient, own_broker: MosquittoBroker
) -> None:
    first = admin.post("/v1/devices/acl-c/credentials").json()["password"]
    assert _accepted(own_broker, "acl-c", first)
    second = admin.post("/v1/devices/acl-c/credentials").json()["password"]
    assert _accepted(own_broker, "acl-c", second)
    assert _refused(own_broker, "acl-c", first)
    r = admin.delete("/v1/devices/acl-c/credentials")
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert _refused(own_broker, "acl-c", second)
    # the control plane itself keeps its access through every rewrite
    assert _accepted(own_broker, CONTROL_PLANE_USER, own_broker.users[CONTROL_PLANE_USER])
    assert admin.delete("/v1/devices/never-enrolled/credentials").status_code == 404


def test_bad_ids_and_the_control_planes_own_name_are_refused(admin: TestClient) -> None:
    assert admin.post("/v1/devices/Bad%20Id/credentials").status_code == 422
    assert admin.post(f"/v1/devices/{CONTROL_PLANE_USER}/credentials").status_code == 422


def test_device_credentials_get_nothing_on_the_admin_api(
    admin: TestClient, enrolled: dict[str, str]
) -> None:
    basic = base64.b64encode(f"acl-a:{enrolled['acl-a']}".encode()).decode()
    for headers in (bearer(enrolled["acl-a"]), {"Authorization": f"Basic {basic}"}):
        for method, path in (("GET", "/v1/devices"), ("GET", "/v1/devices/acl-a"),
                             ("POST", "/v1/devices/acl-a/credentials")):
            r = admin.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers)


def test_enrollment_is_off_without_the_broker_files(tmp_path: Path) -> None:
    app, engine = registry_api(tmp_path)
    try:
        r = TestClient(app, headers=bearer(issue(app, Role.ADMIN))).post(
            "/v1/devices/acl-z/credentials"
        )
        assert r.status_code == 404 and "mosquitto_passwd_file" in r.json()["detail"]
    finally:
        engine.dispose()


