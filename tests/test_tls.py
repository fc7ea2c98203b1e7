"""TLS for MQTT and the HTTP API, with a CA generated for the test.

A broker that speaks only TLS, a control plane that reaches it over
``mqtts://`` and serves its API over HTTPS, and a device that connects with
the CA pinned. Clients that do not trust the CA, or skip TLS, get nowhere.
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import protocol as p
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.config import ControlPlaneSettings
from controlplane.devfleet.mosquitto import BrokerTls, MosquittoBroker
from controlplane.service import ControlPlane
from slmfleet.app import build_app
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings, hello, wait_until
from tests.support.mqtt import RawClient
from tests.support.tls import Pki, make_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    tls = BrokerTls(pki.cert_file, pki.key_file, pki.ca_file)
    users = {CONTROL_PLANE_USER: secrets.token_urlsafe(16)}
    with MosquittoBroker(tmp_path_factory.mktemp("tls-broker"), users=users, tls=tls) as broker:
        yield broker


def _trust(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


def _tls_client(broker: MosquittoBroker, user: str, password: str, ca: Path | None) -> RawClient:
    client = RawClient(broker.url, user, password)
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    client.client.tls_set_context(context)
    return client


@pytest.fixture(scope="module")
def plane(
    pki: Pki, tls_broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    settings = cp_settings(
        tmp_path_factory.mktemp("tls-cp"), tls_broker,
        (CONTROL_PLANE_USER, tls_broker.users[CONTROL_PLANE_USER]),
        mqtt_tls_ca_file=pki.ca_file,
        api_tls_cert_file=pki.cert_file,
        api_tls_key_file=pki.key_file,
    )
    cp = ControlPlane(settings).start()
    yield cp
    cp.stop()


def test_the_broker_speaks_tls_to_clients_that_trust_its_ca(
    pki: Pki, tls_broker: MosquittoBroker
) -> None:
    assert tls_broker.url.startswith("mqtts://")
    password = provision_device_tls(tls_broker, "tls-dev-1", pki)
    client = _tls_client(tls_broker, "tls-dev-1", password, pki.ca_file)
    assert not client.connect().is_failure
    try:
        topic = p.device_topic("tls-dev-1", p.TopicKind.TELEMETRY)
        assert not client.publish(topic, b"{}").is_failure
    finally:
        client.close()


def test_plain_tcp_and_an_untrusted_ca_get_no_connection(
    pki: Pki, tls_broker: MosquittoBroker, tmp_path: Path
) -> None:
    cp_password = tls_broker.users[CONTROL_PLANE_USER]
    plain = RawClient(tls_broker.url.replace("mqtts://", "mqtt://"), CONTROL_PLANE_USER,
                      cp_password)
    try:
        with pytest.raises(AssertionError, match="no CONNACK"):
            plain.connect(timeout=2)
    finally:
        plain.close()

    other = make_pki(tmp_path / "other", name="someone else's CA")
    stranger = _tls_client(tls_broker, CONTROL_PLANE_USER, cp_password, other.ca_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.client.connect(tls_broker.host, tls_broker.port)


def test_the_control_plane_ingests_over_mqtts_and_serves_https(
    pki: Pki, tls_broker: MosquittoBroker, plane: ControlPlane
) -> None:
    assert plane.api_url.startswith("https://127.0.0.1:")
    health = httpx.get(f"{plane.api_url}/healthz", verify=_trust(pki)).json()
    assert health == {"status": "ok", "database": True, "mqtt": True, "leader": True}

    password = provision_device_tls(tls_broker, "tls-dev-2", pki)
    device = _tls_client(tls_broker, "tls-dev-2", password, pki.ca_file)
    assert not device.connect().is_failure
    try:
        msg = hello("tls-dev-2", tier="small")
        assert not device.publish(p.device_topic("tls-dev-2", p.TopicKind.HELLO),
                                  p.encode(msg)).is_failure
    finally:
        device.close()

    def seen() -> Any:
        r = httpx.get(f"{plane.api_url}/v1/devices/tls-dev-2", headers=ADMIN_HEADERS,
                      verify=_trust(pki))
        return r.json() if r.status_code == 200 else None

    assert wait_until(seen, 10, "device over TLS")["tier"] == "small"


def test_https_refuses_clients_that_do_not_trust_the_ca_or_speak_plain_http(
    plane: ControlPlane,
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{plane.api_url}/healthz")
    plain = plane.api_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(f"{plain}/healthz", timeout=3)
        r.raise_for_status()


def test_the_cli_trusts_a_private_ca_through_ssl_cert_file(
    pki: Pki, plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    result = CliRunner().invoke(
        build_app("devices"),
        ["devices", "list", "--server", plane.api_url, "--token", ADMIN_TOKEN, "-o", "json"],
    )
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.output), list)


def test_tls_settings_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        ControlPlaneSettings(data_dir=tmp_path, api_tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="mqtts"):
        ControlPlaneSettings(data_dir=tmp_path, mqtt_tls_ca_file=tmp_path / "ca.pem")
    s = ControlPlaneSettings(data_dir=tmp_path, mqtt_url="mqtts://127.0.0.1")
    assert s.mqtt_tls and s.mqtt_port == 8883
    assert isinstance(s.mqtt_tls_context(), ssl.SSLContext)


def provision_device_tls(broker: MosquittoBroker, device_id: str, pki: Pki) -> str:
    """Add ``device_id`` to the TLS broker and wait until it accepts the password."""
    password = secrets.token_urlsafe(16)
    broker.add_users({device_id: password})

    def accepted() -> bool:
        client = _tls_client(broker, device_id, password, pki.ca_file)
        try:
            return not client.connect(timeout=2).is_failure
        finally:
            client.close()

    wait_until(accepted, 5, f"{device_id} accepted")
    return password


